"""export_onnx: every stage written as ONNX that onnx.checker accepts and onnxruntime runs with
the same answers as fxcompress; bad input refused before anything is written.

Real weights and data: the digits CNN/ResNet trained on scikit-learn's digits. onnxruntime's
int8 kernels requantize with one combined scale (fxcompress multiplies step by step), so its
codes differ by one now and then: outputs are held to SQNR and top-1 agreement, not bit for
bit (benchmarks/deploy.py measures the zoo models); form="integer" computes the reference
lowering's arithmetic and is held to it exactly. Static int8 uses the portable 7-bit
weights: on AVX2 CPUs onnxruntime's u8s8 kernels saturate 16-bit pair sums with 8-bit
weights, as oneDNN's do (docs/deployment.md).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import fxcompress  # noqa: E402
from fxcompress.errors import CalibrationDataError, ExportError  # noqa: E402
from fxcompress.examples import digits  # noqa: E402
from fxcompress.onnx_calibrate import needs_requantization  # noqa: E402
from fxcompress.quant.spec import portable_weight_spec  # noqa: E402

STATIC = fxcompress.recipes.int8_static(weights=portable_weight_spec(), only_if_faster=False)


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run(path: Path, *inputs: torch.Tensor) -> torch.Tensor:
    session = _session(path)
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
    return torch.from_numpy(session.run(None, feeds)[0])


def _sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    return (20 * torch.log10(ref.norm() / (ref - out).norm().clamp_min(1e-30))).item()


def _ops(path: Path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


@pytest.fixture(scope="module")
def data() -> digits.DigitsData:
    return digits.load_digits_data()


@pytest.fixture(scope="module")
def static_resnet(data) -> fxcompress.Result:
    batches = [(data.train_x[i:i + 32], data.train_y[i:i + 32]) for i in range(0, 128, 32)]
    return fxcompress.run(digits.pretrained_digits_resnet(), STATIC, data.test_x[:4], calibration_data=batches,
                          progress=False)


def test_static_int8_is_qdq_and_onnxruntime_agrees(static_resnet, data, tmp_path: Path) -> None:
    path = fxcompress.export_onnx(static_resnet, tmp_path / "q.onnx")
    ops = _ops(path)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0 and ops["Conv"] > 0
    weights = [i for i in onnx.load(str(path)).graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert weights, "int8 weights are stored as int8 initializers"
    x = data.test_x  # 360 held-out digits, a batch size the export never saw: the batch dim is dynamic
    ours, theirs = static_resnet.model(x), _run(path, x)
    assert theirs.shape == ours.shape
    assert _sqnr(ours, theirs) >= 25
    assert (ours.argmax(1) == theirs.argmax(1)).float().mean() >= 0.97
    # onnxruntime runs the QDQ groups on its int8 kernels.
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    assert _ops(tmp_path / "optimized.onnx")["QLinearConv"] > 0


def test_float_and_pruned_models_export_with_their_shapes(data, tmp_path: Path) -> None:
    model = digits.pretrained_digits_cnn().eval()
    x = data.test_x[:8]
    float_path = fxcompress.export_onnx(model, tmp_path / "f.onnx", example_inputs=(x,))
    assert torch.allclose(_run(float_path, x), model(x), atol=1e-4)
    pruned = fxcompress.run(model, [("prune_channels", {"ratio": 0.5}), "eliminate_dead_nodes"], x, progress=False)
    path = fxcompress.export_onnx(pruned, tmp_path / "p.onnx")
    assert torch.allclose(_run(path, x), pruned.model(x), atol=1e-4)
    convs = [i for i in onnx.load(str(path)).graph.initializer if len(i.dims) == 4]
    kept = [m.weight.shape[0] for m in pruned.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert sorted(c.dims[0] for c in convs) == sorted(kept) and sum(kept) < sum(
        m.weight.shape[0] for m in model.modules() if isinstance(m, torch.nn.Conv2d))


def test_folded_model_exports_its_float_simulation(data, tmp_path: Path) -> None:
    batches = [(data.train_x[i:i + 32], data.train_y[i:i + 32]) for i in range(0, 64, 32)]
    folded = fxcompress.run(digits.pretrained_digits_cnn(), STATIC[:4], data.test_x[:4], calibration_data=batches,
                            progress=False)
    x = data.test_x[:32]
    assert _sqnr(folded.model(x), _run(fxcompress.export_onnx(folded, tmp_path / "fold.onnx"), x)) >= 35


def _bert():
    from fxcompress.examples.bert import BertConfig, BertStyleEncoder, bert_inputs

    config = BertConfig(vocab_size=1200, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                        max_positions=32)
    torch.manual_seed(0)
    return BertStyleEncoder(config).eval(), bert_inputs(2, 16, config), bert_inputs(5, 16, config, seed=1)


@pytest.mark.parametrize("granularity", ["per_tensor", "per_token"])
def test_dynamic_int8_is_matmul_integer(granularity: str, tmp_path: Path) -> None:
    model, ids, other = _bert()
    result = fxcompress.run(model, [("quantize_dynamic", {"granularity": granularity})], ids, progress=False)
    path = fxcompress.export_onnx(result, tmp_path / "dyn.onnx", example_inputs=(ids,))
    ops = _ops(path)
    assert ops["MatMulInteger"] > 0 and (ops["DynamicQuantizeLinear"] > 0) == (granularity == "per_tensor")
    ours, theirs = result.model(other), _run(path, other)
    assert torch.nn.functional.cosine_similarity(ours.flatten(), theirs.flatten(), dim=0) >= 0.999


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_weight_only_is_matmul_nbits(bits: int, tmp_path: Path) -> None:
    model, ids, other = _bert()
    result = fxcompress.run(model, [("quantize_weights", {"bits": bits, "group_size": 32})], ids, progress=False)
    path = fxcompress.export_onnx(result, tmp_path / "w4.onnx", example_inputs=(ids,))
    assert _ops(path)["MatMulNBits"] > 0
    ours, theirs = result.model(other), _run(path, other)
    assert torch.nn.functional.cosine_similarity(ours.flatten(), theirs.flatten(), dim=0) >= 0.999


def test_a_module_with_no_onnx_form_is_named_before_anything_is_written(tmp_path: Path) -> None:
    model, ids, _ = _bert()
    result = fxcompress.run(model, [("quantize_weights", {"bits": 4, "group_size": 8})], ids, progress=False)
    with pytest.raises(ExportError, match=r"module '.*' \(WeightOnlyLinear\) has no ONNX mapping.*group_size=32"):
        fxcompress.export_onnx(result, tmp_path / "w2.onnx", example_inputs=(ids,))
    assert list(tmp_path.iterdir()) == []


def test_old_opset_and_existing_file_are_refused(static_resnet, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"opset 12 is too old: per-channel QuantizeLinear"):
        fxcompress.export_onnx(static_resnet, tmp_path / "old.onnx", opset=12)
    (tmp_path / "there.onnx").write_bytes(b"keep")
    with pytest.raises(ExportError, match="already exists"):
        fxcompress.export_onnx(static_resnet, tmp_path / "there.onnx")
    assert (tmp_path / "there.onnx").read_bytes() == b"keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["there.onnx"]


def test_the_callers_model_is_not_changed(static_resnet, tmp_path: Path) -> None:
    before = {k: v.clone() for k, v in static_resnet.model.state_dict().items()}
    kinds = [type(m) for m in static_resnet.model.modules()]
    fxcompress.export_onnx(static_resnet, tmp_path / "q.onnx")
    assert [type(m) for m in static_resnet.model.modules()] == kinds
    assert all(torch.equal(before[k], v) for k, v in static_resnet.model.state_dict().items())


@pytest.mark.slow  # one export per kind of op: ~40-80 s on 2 shared cores
def test_each_lowered_op_is_within_one_code_of_ours_teacher_forced(static_resnet, data, tmp_path: Path) -> None:
    """Per op, on the inputs ours saw: the QDQ semantics (onnxruntime without graph rewrites,
    so no CPU-specific int8 kernel) within one code of fxcompress's, and rarely off at all."""
    from fxcompress.onnx_forms import NO_FORM, onnx_form
    from fxcompress.quant.contract import lowered_module_io

    model = static_resnet.model
    seen = lowered_module_io(model, data.test_x[:16])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    kinds = {}  # one module of each kind (class, fused residual, output dtype) keeps the test short
    for path, (args, out) in seen.items():
        module = model.get_submodule(path)
        kinds.setdefault((type(module), getattr(module, "residual", None), out.dtype), (path, args, out))
    assert len(kinds) >= 6
    for path, args, out in kinds.values():
        twin = onnx_form(model.get_submodule(path))
        assert twin is not NO_FORM and not isinstance(twin, str), path
        torch.onnx.export(twin, tuple(args), str(tmp_path / "op.onnx"), dynamo=True, verbose=False)
        session = ort.InferenceSession(str(tmp_path / "op.onnx"), options, providers=["CPUExecutionProvider"])
        theirs = torch.from_numpy(session.run(None, {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)})[0])
        if out.dtype == torch.uint8:
            diff = (theirs.int() - out.int()).abs()
            assert diff.max() <= 1 and (diff > 0).float().mean() <= 0.01, path
        else:  # float out: the int32-rounded bias moves it by up to half an accumulator step
            assert torch.allclose(theirs, out, rtol=1e-3, atol=1e-3 * out.abs().max().item()), path


def test_integer_form_computes_the_reference_arithmetic(data, tmp_path: Path) -> None:
    """form="integer": ConvInteger/MatMulInteger and the reference rescale as float ops, so
    onnxruntime (all graph optimizations on) returns the reference lowering's codes exactly:
    integer accumulation, then IEEE float32 steps in the same order (relu post-ops only).
    8-bit weights: the u8u8 GEMM is exact on AVX2 too, where u8s8 pair sums saturate."""
    batches = [(data.train_x[i:i + 32], data.train_y[i:i + 32]) for i in range(0, 128, 32)]
    pipeline = fxcompress.recipes.int8_static(backend="reference")
    result = fxcompress.run(digits.pretrained_digits_resnet(), pipeline, data.test_x[:4], calibration_data=batches,
                            progress=False)
    path = fxcompress.export_onnx(result, tmp_path / "i.onnx", form="integer")
    ops = _ops(path)
    assert ops["ConvInteger"] > 0 and ops["QuantizeLinear"] == 0 and ops["Round"] > 0
    x = data.test_x
    ours, theirs = result.model(x), _run(path, x)
    # The only float ops after the last requantization are the head's (pool / linear): float round-off.
    assert torch.allclose(theirs, ours, rtol=1e-5, atol=1e-5 * ours.abs().max().item())
    assert torch.equal(ours.argmax(1), theirs.argmax(1))


def test_integer_form_stays_within_the_x86_contract_of_ours(static_resnet, data, tmp_path: Path) -> None:
    path = fxcompress.export_onnx(static_resnet, tmp_path / "i.onnx", form="integer")
    x = data.test_x
    ours, theirs = static_resnet.model(x), _run(path, x)
    qdq = _run(fxcompress.export_onnx(static_resnet, tmp_path / "q.onnx"), x)
    # ours (x86) is within one code per op of the reference, which the integer form computes.
    assert _sqnr(ours, theirs) >= 35 and _sqnr(ours, theirs) >= _sqnr(ours, qdq)
    assert (ours.argmax(1) == theirs.argmax(1)).float().mean() >= 0.99


def test_unknown_form_is_refused_before_anything_is_written(static_resnet, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"unknown form 'qlinear': use one of qdq, integer"):
        fxcompress.export_onnx(static_resnet, tmp_path / "f.onnx", form="qlinear")
    assert list(tmp_path.iterdir()) == []


def test_calibrated_qdq_runs_the_residual_convs_on_int8_kernels(static_resnet, data, tmp_path: Path) -> None:
    plain = fxcompress.export_onnx(static_resnet, tmp_path / "plain.onnx")
    batches = [(data.train_x[i:i + 32], data.train_y[i:i + 32]) for i in range(0, 64, 32)]  # labelled, as run takes
    calibrated = fxcompress.export_onnx(static_resnet, tmp_path / "cal.onnx", calibration_data=batches)
    fused = {}
    for name, path in (("plain", plain), ("cal", calibrated)):
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / f"{name}_opt.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        fused[name] = _ops(tmp_path / f"{name}_opt.onnx")
    requantized = sum(1 for m in static_resnet.model.modules() if needs_requantization(m))
    residual_convs = sum(1 for m in static_resnet.model.modules() if getattr(m, "residual", False))
    assert requantized >= residual_convs > 0
    # each conv onnxruntime ran in float gains a Q after it: every conv is now an int8 kernel
    assert fused["cal"]["QLinearConv"] == fused["plain"]["QLinearConv"] + requantized
    assert fused["cal"]["Conv"] + fused["cal"]["FusedConv"] + fused["cal"]["NchwcConv"] == 0
    x = data.test_x
    ours, theirs = static_resnet.model(x), _run(calibrated, x)
    assert _sqnr(ours, theirs) >= 25
    assert (ours.argmax(1) == theirs.argmax(1)).float().mean() >= 0.97


def test_calibration_data_is_checked(static_resnet, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"calibration_data applies to form='qdq' only"):
        fxcompress.export_onnx(static_resnet, tmp_path / "i.onnx", form="integer", calibration_data=[])
    with pytest.raises(ExportError, match=r"calibration_data is empty"):
        fxcompress.export_onnx(static_resnet, tmp_path / "e.onnx", calibration_data=[])
    with pytest.raises(CalibrationDataError, match=r"calibration batch 0"):
        fxcompress.export_onnx(static_resnet, tmp_path / "w.onnx", calibration_data=[torch.zeros(2, 3)])
    assert not list(tmp_path.iterdir())


def test_calibrated_export_leaves_the_model_alone_and_adds_quantized_adds(static_resnet, data, tmp_path: Path) -> None:
    """The calibration hooks run on a copy: the caller's model keeps its state, modules and
    (no) hooks; onnxruntime runs the residual adds the calibrated form writes as QLinearAdd."""
    model = static_resnet.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()]
    batches = [data.train_x[i:i + 16] for i in range(0, 32, 16)]  # unlabelled batches too
    path = fxcompress.export_onnx(static_resnet, tmp_path / "cal.onnx", calibration_data=batches)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()] == hooks
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    residual_convs = sum(1 for m in model.modules() if getattr(m, "residual", False) and m.output == "uint8")
    assert _ops(tmp_path / "opt.onnx")["QLinearAdd"] >= residual_convs > 0
