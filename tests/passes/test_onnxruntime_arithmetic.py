"""``lower(arithmetic="onnxruntime")``: lowered ops that round as onnxruntime's QLinear kernels do.

Per op, teacher forced (the same input codes on both sides), onnxruntime's ``QLinearConv``
and ``QuantizeLinear`` give our codes exactly; its ``QLinearAdd`` picks its kernel by ISA,
so adds are held to one code (exact on the AVX512 machines measured). End to end on the
digits ResNet trained on real digits, the QDQ export run by onnxruntime matches the
lowered model. Weights are the portable 7-bit ones: onnxruntime's u8s8 kernels saturate
16-bit pair sums on AVX2 CPUs with 8-bit weights (docs/deployment.md), which no rounding
order can match.
"""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path

import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import fxcompress  # noqa: E402
from fxcompress.errors import ConfigError  # noqa: E402
from fxcompress.examples import digits  # noqa: E402
from fxcompress.onnx_forms import onnx_form  # noqa: E402
from fxcompress.quant.lowered import (  # noqa: E402
    QuantAdd, QuantConv1d, QuantConv2d, QuantConvNd, Quantize, QuantizeProduct,
)
from fxcompress.quant.lowering.onnxruntime import NOT_REPRODUCED  # noqa: E402
from fxcompress.quant.spec import portable_weight_spec  # noqa: E402

FOR_ORT = fxcompress.recipes.int8_static(weights=portable_weight_spec(), only_if_faster=False, for_onnxruntime=True)


def _session(path: Path, optimized: Path | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _onnxruntime(module: torch.nn.Module, inputs: tuple, tmp_path: Path) -> tuple[torch.Tensor, Counter]:
    """The module's QDQ twin run by onnxruntime (all graph optimizations on), and the ops it ran."""
    path, optimized = tmp_path / "op.onnx", tmp_path / "op_optimized.onnx"
    torch.onnx.export(onnx_form(module), inputs, str(path), dynamo=True, verbose=False)
    session = _session(path, optimized)
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
    ops = Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)
    return torch.from_numpy(session.run(None, feeds)[0]), ops


def _conv(cin: int, cout: int, kernel: int, **kw) -> torch.nn.Conv2d:
    torch.manual_seed(cin * cout + kernel)
    return torch.nn.Conv2d(cin, cout, kernel, **kw)


def _weight_scale(conv: torch.nn.Module) -> torch.Tensor:
    return conv.weight.detach().abs().flatten(1).amax(1) / 63  # 7-bit codes: portable to AVX2


CONVS = {
    "3x3": (lambda: _conv(16, 24, 3, padding=1), "none", ()),
    "3x3 relu": (lambda: _conv(16, 24, 3, padding=1), "relu", ()),
    "stride 2 relu6": (lambda: _conv(8, 16, 3, stride=2, padding=1), "hardtanh", (0.0, 6.0)),
    "depthwise clamp": (lambda: _conv(32, 32, 3, padding=1, groups=32), "hardtanh", (-0.4, 0.5)),
    "1x1 no bias": (lambda: _conv(24, 40, 1, bias=False), "none", ()),
    "even kernel, same": (lambda: _conv(8, 8, 4, padding="same"), "relu", ()),
}


@pytest.mark.parametrize("case", sorted(CONVS))
def test_a_conv_computes_onnxruntimes_qlinearconv_codes_exactly(case: str, tmp_path: Path) -> None:
    make, post_op, args = CONVS[case]
    conv = make()
    x = torch.randint(0, 256, (2, conv.in_channels, 17, 17), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    qparams = dict(input_scale=0.021, input_zero_point=117, output_scale=0.013, output_zero_point=96)
    built = {(backend, arithmetic): QuantConv2d.from_float(conv, _weight_scale(conv), post_op=post_op,
                                                             post_op_args=args, backend=backend,
                                                             arithmetic=arithmetic, **qparams)
             for backend in ("x86", "reference") for arithmetic in ("onednn", "onnxruntime")}
    ours = built["x86", "onnxruntime"](x)
    assert ours.dtype == torch.uint8 and ours.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(ours, built["reference", "onnxruntime"](x))  # the kernel path is exact too
    default = built["x86", "onednn"](x)
    assert (ours.int() - default.int()).abs().max() <= 1  # the two orders: within one code
    theirs, ops = _onnxruntime(built["x86", "onnxruntime"], (x,), tmp_path)
    assert ops["QLinearConv"] == 1 and ops["Conv"] == 0  # fused: onnxruntime's int8 kernel ran
    assert torch.equal(theirs, ours.contiguous())


def test_a_1d_conv_and_quantize_compute_onnxruntimes_codes_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(12, 20, 5, padding=2)
    x = torch.randint(0, 256, (3, 12, 50), dtype=torch.uint8)
    m = QuantConv1d.from_float(conv, _weight_scale(conv), 0.02, 128, 0.017, 120, post_op="relu",
                               arithmetic="onnxruntime")
    theirs, _ = _onnxruntime(m, (x,), tmp_path)
    assert torch.equal(theirs, m(x).contiguous())
    # Quantize: a division by the scale (QuantizeLinear), on values that land on every code,
    # ties included (k + 0.5 steps), channels-last kept.
    q = Quantize.from_qparams(0.0371, 131, arithmetic="onnxruntime")
    ties = (torch.arange(-140, 140) + 0.5).mul(0.0371).reshape(1, 1, 7, 40).expand(2, 3, 7, 40)
    v = torch.cat([torch.randn(2, 3, 40, 40) * 4, ties], dim=2)
    v = v.contiguous(memory_format=torch.channels_last)
    ours = q(v)
    assert ours.is_contiguous(memory_format=torch.channels_last)
    theirs, _ = _onnxruntime(q, (v,), tmp_path)
    assert torch.equal(theirs, ours.contiguous())
    default = Quantize.from_qparams(0.0371, 131)(v)
    assert (ours.int() - default.int()).abs().max() <= 1


def test_a_gate_product_quantizes_as_mul_then_quantizelinear(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 24, 14, 14, generator=gen).mul(3).contiguous(memory_format=torch.channels_last)
    gains = torch.rand(2, 24, 1, 1, generator=gen)
    m = QuantizeProduct.from_qparams(0.029, 122, arithmetic="onnxruntime")
    ours = m(x, gains)
    theirs, _ = _onnxruntime(m, (x, gains), tmp_path)
    assert ours.is_contiguous(memory_format=torch.channels_last) and torch.equal(theirs, ours.contiguous())
    assert (ours.int() - QuantizeProduct.from_qparams(0.029, 122)(x, gains).int()).abs().max() <= 1


@pytest.mark.parametrize("relu", [False, True])
def test_an_add_computes_onnxruntimes_qlinearadd_within_one_code(relu: bool, tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(5)
    a, b = (torch.randint(0, 256, (2, 32, 30, 30), dtype=torch.uint8, generator=gen)
            .contiguous(memory_format=torch.channels_last) for _ in range(2))
    qp = dict(input_qparams=(0.031, 140), other_qparams=(0.017, 101), output_qparams=(0.043, 0 if relu else 77))
    m = QuantAdd.from_qparams(**qp, relu=relu, arithmetic="onnxruntime")
    ours = m(a, b)
    assert torch.equal(ours, QuantAdd.from_qparams(**qp, relu=relu, backend="reference", arithmetic="onnxruntime")(a, b))
    theirs, ops = _onnxruntime(m, (a, b), tmp_path)
    assert ops["QLinearAdd"] == 1
    diff = (theirs.int() - ours.contiguous().int()).abs()
    # onnxruntime's add kernel depends on the ISA (exact on the AVX512 CPUs measured).
    assert diff.max() <= 1 and (diff > 0).float().mean() <= 1e-4
    default = QuantAdd.from_qparams(**qp, relu=relu)(a, b)
    assert (ours.int() - default.int()).abs().max() <= 1


def test_a_relu_add_with_a_nonzero_zero_point_clamps_its_codes(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(6)
    a, b = (torch.randint(0, 256, (1, 8, 9, 9), dtype=torch.uint8, generator=gen) for _ in range(2))
    m = QuantAdd.from_qparams((0.03, 128), (0.02, 128), (0.05, 60), relu=True, arithmetic="onnxruntime")
    ours = m(a, b)
    assert int(ours.min()) == 60  # the code of 0.0: negative sums clamp there
    theirs, _ = _onnxruntime(m, (a, b), tmp_path)
    assert (theirs.int() - ours.contiguous().int()).abs().max() <= 1


@pytest.mark.parametrize("kwargs, reason", [
    (dict(residual=True, residual_scale=0.1), "fused residual"),
    (dict(post_op="swish"), "post-op 'swish'"),
    (dict(output_scale=None), "float32 output"),
])
def test_a_conv_onnxruntime_cannot_fuse_refuses_its_arithmetic(kwargs: dict, reason: str) -> None:
    conv = _conv(4, 4, 3, padding=1)
    base = dict(input_scale=0.1, input_zero_point=0, output_scale=0.1, output_zero_point=0)
    with pytest.raises(ConfigError, match=reason):
        QuantConv2d.from_float(conv, _weight_scale(conv), **{**base, **kwargs}, arithmetic="onnxruntime")
    with pytest.raises(ConfigError, match="arithmetic must be one of"):
        Quantize.from_qparams(0.1, 0, arithmetic="mlas")
    with pytest.raises(ConfigError, match="arithmetic must be one of"):
        fxcompress.run(digits.pretrained_digits_cnn(), [("lower", {"arithmetic": "ort"})], (torch.randn(2, 1, 8, 8),),
                       progress=False)


@pytest.fixture(scope="module")
def data() -> digits.DigitsData:
    return digits.load_digits_data()


@pytest.fixture(scope="module")
def for_ort(data) -> fxcompress.Result:
    batches = [(data.train_x[i:i + 32], data.train_y[i:i + 32]) for i in range(0, 128, 32)]
    return fxcompress.run(digits.pretrained_digits_resnet(), FOR_ORT, data.test_x[:4], calibration_data=batches,
                          progress=False)


def test_the_lowering_switches_what_onnxruntime_fuses_and_reports_the_rest(for_ort) -> None:
    stats = next(r.stats for r in for_ort.report.rows if r.name == "lower")
    modules = [m for m in for_ort.model.modules() if hasattr(m, "arithmetic")]
    switched = Counter(type(m).__name__ for m in modules if m.arithmetic == "onnxruntime")
    assert stats["onnxruntime_arithmetic"] == dict(switched)
    assert switched["QuantConv2d"] > 0 and switched["QuantAdd"] > 0 and switched["Quantize"] > 0
    kept = {name for name, m in for_ort.model.named_modules() if getattr(m, "arithmetic", "") == "onednn"}
    # Everything with a choice switched here; the classifier (QuantLinear) is reported as not reproduced.
    assert kept <= set(stats["onednn_arithmetic"]) and stats["onednn_arithmetic"]
    for name, reason in stats["onednn_arithmetic"].items():
        module = for_ort.model.get_submodule(name)
        assert reason == (module.onnxruntime_problem() if name in kept else NOT_REPRODUCED[type(module)])
    assert any("onnxruntime arithmetic" in note for note in stats["notes"])


def test_onnxruntime_runs_the_lowered_digits_resnet_with_our_codes(for_ort, data, tmp_path: Path) -> None:
    path = fxcompress.export_onnx(for_ort, tmp_path / "ort.onnx")
    session = _session(path, tmp_path / "optimized.onnx")
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)
    convs = sum(isinstance(m, QuantConvNd) for m in for_ort.model.modules())
    switched = sum(isinstance(m, QuantConvNd) and m.arithmetic == "onnxruntime" for m in for_ort.model.modules())
    assert ops["QLinearConv"] == switched and ops["QLinearAdd"] > 0 and switched < convs + 1
    x = data.test_x  # 360 held-out digits
    theirs = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.inference_mode():
        ours = for_ort.model(x)
    # Exact but for onnxruntime's float ops (the float classifier) and its ISA-chosen add
    # kernel: the float32 outputs agree to float round-off, the predictions entirely.
    assert torch.allclose(theirs, ours, rtol=1e-4, atol=1e-4 * float(ours.abs().max()))
    assert torch.equal(theirs.argmax(1), ours.argmax(1))
    # The integer form takes the same QDQ twins for these ops (onnxruntime computes them exactly).
    integer = fxcompress.export_onnx(for_ort, tmp_path / "int.onnx", form="integer")
    int_ops = Counter(n.op_type for n in onnx.load(str(integer)).graph.node)
    assert int_ops["ConvInteger"] == convs - switched


def test_the_arithmetic_survives_save_load_export_and_compile(for_ort, data, tmp_path: Path) -> None:
    x = data.test_x[:16]
    with torch.inference_mode():
        ours = for_ort.model(x)
    fxcompress.save(for_ort, tmp_path / "a.fxc")
    loaded = fxcompress.load(tmp_path / "a.fxc")
    def arithmetic(gm: torch.nn.Module) -> dict[str, str]:
        return {name: m.arithmetic for name, m in gm.named_modules() if hasattr(m, "arithmetic")}

    assert arithmetic(loaded) == arithmetic(for_ort.model) and "onnxruntime" in arithmetic(loaded).values()
    with torch.inference_mode():
        assert torch.equal(loaded(x), ours)
    program = torch.export.export(for_ort.model, (x,))
    names = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "fxcompress.qconv_onnxruntime.default" in names and "fxcompress.add_onnxruntime.default" in names
    with torch.inference_mode():
        assert torch.equal(program.module()(x), ours)
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(for_ort.model))  # the new ops are opaque calls for inductor
    with torch.inference_mode():
        assert torch.equal(compiled(x), ours)


def test_the_recipe_builds_for_onnxruntime_without_this_cpus_timings() -> None:
    def lower_options(**kwargs) -> dict:
        entry = next(e for e in fxcompress.recipes.int8_static(**kwargs) if (e if isinstance(e, str) else e[0]) == "lower")
        return {} if isinstance(entry, str) else entry[1]

    assert lower_options(for_onnxruntime=True) == {"only_if_faster": False, "arithmetic": "onnxruntime"}
    assert lower_options() == {"only_if_faster": True}
    assert lower_options(for_onnxruntime=True, only_if_faster=True)["only_if_faster"] is True


def _nearly_dead_stem() -> torch.nn.Module:
    """A stem whose channel 2 is nearly dead, as BatchNorm folding leaves some pretrained
    stems (EfficientNet-Lite0 has two): weights of ~1e-7 under a bias of -6."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.ReLU6(),
                                torch.nn.Conv2d(8, 8, 3, padding=1, groups=8), torch.nn.ReLU6(),
                                torch.nn.Conv2d(8, 4, 1))
    with torch.no_grad():
        model[0].weight[2].mul_(1e-6)
        model[0].bias[2] = -6.0
    return model.eval()


def test_a_nearly_dead_channel_gets_a_weight_scale_its_int32_bias_fits(tmp_path: Path) -> None:
    """Its observed weight scale (~1e-8, floored at float32's eps) puts the bias near -2**32 on
    the accumulator grid: fold_fake_quant widens that channel's scale, so the bias fits int32 and
    onnxruntime (whose int32 sum would wrap around) computes our codes."""
    torch.manual_seed(1)
    x, calibration = torch.randn(2, 3, 32, 32), [torch.randn(4, 3, 32, 32) for _ in range(4)]
    result = fxcompress.run(_nearly_dead_stem(), FOR_ORT, x, calibration_data=calibration, progress=False)
    fold = next(r.stats for r in result.report.rows if r.name == "fold_fake_quant")
    assert fold["bias_widened_channels"] == 1
    stem = next(m for m in result.model.modules() if isinstance(m, QuantConv2d))
    assert stem.arithmetic == "onnxruntime"
    codes = stem.bias.double() / (float(stem.input_scale) * stem.weight_scale.double())
    assert float(codes.abs().max() / 2 ** 30) == pytest.approx(1.0, abs=1e-6) == float(codes[2].abs() / 2 ** 30)
    session = _session(fxcompress.export_onnx(result, tmp_path / "stem.onnx"))
    theirs = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.inference_mode():
        ours = result.model(x)
    assert torch.allclose(theirs, ours, rtol=1e-5, atol=1e-5 * float(ours.abs().max()))


def test_a_bias_beyond_int32_on_its_grid_is_refused_not_clamped() -> None:
    conv = _conv(3, 4, 3)
    scale = _weight_scale(conv)
    scale[1] = 1e-9  # bias / (0.02 * 1e-9): beyond 2**31
    with pytest.raises(ConfigError, match=r"channel\(s\) \[1\] does not fit int32.*fold_fake_quant"):
        QuantConv2d.from_float(conv, scale, 0.02, 128, 0.05, 0, arithmetic="onnxruntime")
