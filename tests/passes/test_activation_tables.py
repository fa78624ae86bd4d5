"""``insert_observers(post_ops="tables")``: activations after convs as uint8 tables (``QuantTable``),
squeeze-excitation gates on codes (``QuantAdaptiveAvgPool2d``, ``QuantMul``).

A conv or linear then fuses only the clamps onnxruntime's QLinearConv fuses (ReLU, ReLU6); SiLU,
hardswish, GELU, tanh, leaky ReLU and sigmoid after one are quantized at their input too and
computed on the codes as a table of 256 output codes: the folded graph's codes for every
input code (the reference lowering equals the folded graph bit for bit), exported as ONNX
``GatherElements``, which onnxruntime computes exactly. A gate's global pool and product take codes
too: onnxruntime's QLinearGlobalAveragePool and QLinearMul, whose arithmetic
``lower(arithmetic="onnxruntime")`` computes. On torchvision's EfficientNet-B0 (random init,
64 px) and on random codes against onnxruntime itself.
"""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path

import pytest
import torch
import torchvision

import fxcompress
from fxcompress.errors import ConfigError, InputError
from fxcompress.quant.contract import check_contract
from fxcompress.quant.lowered import (
    Dequantize, QuantAdaptiveAvgPool2d, QuantConvNd, QuantMul, Quantize, QuantTable,
)
from fxcompress.quant.spec import portable_weight_spec

OBSERVE = {"weights": portable_weight_spec(), "residual_adds": "separate", "post_ops": "tables"}
FOLD = ["fuse_conv_bn", ("insert_observers", OBSERVE), "calibrate", "fold_fake_quant"]


@pytest.mark.parametrize("activation, args", [("swish", ()), ("hardswish", ()), ("gelu", ()), ("tanh", ()),
                                              ("leaky_relu", (0.1,)), ("sigmoid", ())])
def test_a_table_computes_what_dequantize_then_quantize_with_the_activation_compute(activation, args) -> None:
    table = QuantTable.from_activation(activation, args, (0.043, 131), (0.021, 17))
    codes = torch.arange(256, dtype=torch.uint8).repeat(6).reshape(2, 3, 16, 16)
    codes = codes.contiguous(memory_format=torch.channels_last)
    values = Dequantize.from_qparams(0.043, 131)(codes)
    expected = (Quantize.from_qparams(0.021, 17)(torch.sigmoid(values)) if activation == "sigmoid" else
                Quantize.from_qparams(0.021, 17, activation=activation, activation_args=args)(values))
    out = table(codes)
    assert torch.equal(out, expected) and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(table(codes[0, 0]), expected[0, 0])  # any rank
    with pytest.raises(InputError, match="uint8"):
        table(codes.float())
    with pytest.raises(ConfigError, match="post_op"):
        QuantTable.from_activation("sigmoidal", (), (0.043, 131), (0.021, 17))


@pytest.fixture(scope="module")
def effnet() -> tuple[torch.nn.Module, torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = torchvision.models.efficientnet_b0(num_classes=10).eval()
    with torch.no_grad():  # BatchNorm statistics of a trained net's scale, so activations do not vanish
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.4)
    gen = torch.Generator().manual_seed(1)
    return model, torch.randn(2, 3, 64, 64, generator=gen), [torch.randn(4, 3, 64, 64, generator=gen) for _ in range(2)]


def test_tables_take_the_silus_after_convs_and_the_reference_lowering_equals_the_folded_graph(effnet) -> None:
    model, x, cal = effnet
    folded = fxcompress.run(model, FOLD, (x,), calibration_data=cal, progress=False).model
    low = fxcompress.run(model, FOLD + [("lower", {"backend": "reference"})], (x,), calibration_data=cal,
                         progress=False)
    # Every SiLU after a conv (stem, 15 expand, 16 depthwise, 16 squeeze-excitation fc1, head)
    # and every gate's sigmoid is a table; each gate's pool and product compute on codes.
    assert Counter(m.activation for m in low.model.modules() if isinstance(m, QuantTable)) == {
        "swish": 49, "sigmoid": 16}
    assert {k: v for k, v in low.report.rows[-1].stats["int8_ops"].items() if k != "conv"} == {
        "table": 65, "mul": 16, "avg_pool": 17, "add": 9, "linear": 1}
    assert all(m.post_op == "none" for m in low.model.modules() if isinstance(m, QuantConvNd))
    with torch.inference_mode():
        assert torch.equal(low.model(x), folded(x))
    x86 = fxcompress.run(model, FOLD + [("lower", {"only_if_faster": False})], (x,), calibration_data=cal,
                         progress=False).model
    report = check_contract(x86, x)
    assert report.holds and any(a.module == "QuantTable" and a.differing == 0 for a in report.ops)


def test_tables_survive_save_load_export_and_compile(effnet, tmp_path: Path) -> None:
    model, x, cal = effnet
    result = fxcompress.run(model, FOLD + [("lower", {"only_if_faster": False})], (x,), calibration_data=cal,
                            progress=False)
    with torch.inference_mode():
        ours = result.model(x)
    fxcompress.save(result, tmp_path / "t.fxc")
    loaded = fxcompress.load(tmp_path / "t.fxc")
    assert sum(isinstance(m, QuantTable) for m in loaded.modules()) == 65
    with torch.inference_mode():
        assert torch.equal(loaded(x), ours)
    program = torch.export.export(result.model, (x,))
    with torch.inference_mode():
        assert torch.equal(program.module()(x), ours)
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(result.model))
    with torch.inference_mode():
        assert torch.equal(compiled(x), ours)


def test_onnxruntime_computes_the_tables_and_the_convs_before_them_exactly(onnxruntime_run, tmp_path: Path) -> None:
    """Built for onnxruntime: every conv is a QLinearConv (the SiLU / hardswish no longer
    splits it) and every table a GatherElements; onnxruntime's codes are ours, so the outputs agree
    to the float head's round-off."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, stride=2, padding=1), torch.nn.SiLU(),
                                torch.nn.Conv2d(16, 16, 3, padding=1, groups=16), torch.nn.Hardswish(),
                                torch.nn.Conv2d(16, 24, 1), torch.nn.GELU(), torch.nn.Conv2d(24, 8, 1)).eval()
    gen = torch.Generator().manual_seed(1)
    x, cal = torch.randn(3, 3, 32, 32, generator=gen), [torch.randn(8, 3, 32, 32, generator=gen) for _ in range(2)]
    recipe = fxcompress.recipes.int8_static(weights=portable_weight_spec(), for_onnxruntime=True)
    result = fxcompress.run(model, recipe, (x,), calibration_data=cal, progress=False)
    assert Counter(m.activation for m in result.model.modules() if isinstance(m, QuantTable)) == {
        "swish": 1, "hardswish": 1, "gelu": 1}
    theirs, ops = onnxruntime_run(fxcompress.export_onnx(result, tmp_path / "t.onnx"), x)
    assert ops["QLinearConv"] == 3 and ops["GatherElements"] == 3  # the last conv: float out
    with torch.inference_mode():
        ours = result.model(x)
    assert torch.allclose(theirs, ours, rtol=1e-5, atol=1e-5 * float(ours.abs().max()))


def test_an_unknown_post_ops_choice_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="post_ops"):
        fxcompress.run(torchvision.models.resnet18(), [("insert_observers", {"post_ops": "lookup"})],
                       (torch.randn(1, 3, 32, 32),), progress=False)


def test_an_effnet_built_for_onnxruntime_runs_there_with_our_codes(effnet, onnxruntime_run, tmp_path: Path) -> None:
    """Every conv a QLinearConv, every gate QLinearGlobalAveragePool + QLinearMul: onnxruntime
    computes our codes end to end (the float classifier: round-off)."""
    model, x, cal = effnet
    recipe = fxcompress.recipes.int8_static(weights=portable_weight_spec(), for_onnxruntime=True)
    result = fxcompress.run(model, recipe, (x,), calibration_data=cal, progress=False)
    theirs, ops = onnxruntime_run(fxcompress.export_onnx(result, tmp_path / "e.onnx"), x)
    assert (ops["QLinearConv"], ops["QLinearGlobalAveragePool"], ops["QLinearMul"], ops["GatherElements"]) == (81, 17, 16, 65)
    assert ops["Conv"] == ops["FusedConv"] == ops["Sigmoid"] == 0
    with torch.inference_mode():
        ours = result.model(x)
    assert torch.allclose(theirs, ours, rtol=1e-5, atol=1e-5 * float(ours.abs().max()))


def _qdq_graph(op: str, shapes: list[tuple[int, ...]], qparams: list[tuple[float, int]]):
    """A one-op QDQ ONNX graph: DequantizeLinear of each uint8 input, ``op``, QuantizeLinear."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    inits, nodes, inputs = [], [], []
    for i, (shape, (scale, zp)) in enumerate(zip(shapes, qparams)):
        inits += [numpy_helper.from_array(np.array(scale, np.float32), f"s{i}"),
                  numpy_helper.from_array(np.array(zp, np.uint8), f"z{i}")]
        inputs.append(helper.make_tensor_value_info(f"x{i}", TensorProto.UINT8, list(shape)))
        nodes.append(helper.make_node("DequantizeLinear", [f"x{i}", f"s{i}", f"z{i}"], [f"f{i}"]))
    scale, zp = qparams[-1]
    inits += [numpy_helper.from_array(np.array(scale, np.float32), "so"), numpy_helper.from_array(np.array(zp, np.uint8), "zo")]
    nodes += [helper.make_node(op, [f"f{i}" for i in range(len(shapes))], ["y"]),
              helper.make_node("QuantizeLinear", ["y", "so", "zo"], ["q"])]
    graph = helper.make_graph(nodes, op, inputs, [helper.make_tensor_value_info("q", TensorProto.UINT8, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("seed", range(6))
def test_the_gate_ops_compute_onnxruntimes_qlinearmul_and_global_pool_exactly(seed: int, onnxruntime_run,
                                                                               tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    gen = torch.Generator().manual_seed(seed)
    scales = [float(torch.exp(torch.empty(()).uniform_(-6, -1, generator=gen))) for _ in range(3)]
    zps = [int(torch.randint(0, 256, (), generator=gen)) for _ in range(3)]
    qp = list(zip(scales, zps))
    x = torch.randint(0, 256, (2, 96, 14, 14), dtype=torch.uint8, generator=gen)
    gains = torch.randint(0, 256, (2, 96, 1, 1), dtype=torch.uint8, generator=gen)
    onnx.save(_qdq_graph("Mul", [x.shape, gains.shape], qp), str(tmp_path / "mul.onnx"))
    theirs, ops = onnxruntime_run(tmp_path / "mul.onnx", x, gains)
    assert ops["QLinearMul"] == 1
    mul = QuantMul.from_qparams(qp[0], qp[1], qp[2], arithmetic="onnxruntime")
    cl = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(mul(cl, gains), theirs)
    # The default arithmetic is the folded graph's: dequantize, multiply, quantize.
    folded = Quantize.from_qparams(*qp[2])(Dequantize.from_qparams(*qp[0])(cl) * Dequantize.from_qparams(*qp[1])(gains))
    assert torch.equal(QuantMul.from_qparams(qp[0], qp[1], qp[2])(cl, gains), folded)
    onnx.save(_qdq_graph("GlobalAveragePool", [x.shape], [qp[0], qp[2]]), str(tmp_path / "gap.onnx"))
    theirs, ops = onnxruntime_run(tmp_path / "gap.onnx", x)
    assert ops["QLinearGlobalAveragePool"] == 1
    pool = QuantAdaptiveAvgPool2d.from_float(torch.nn.AdaptiveAvgPool2d(1), *qp[0], *qp[2])
    pool.arithmetic = "onnxruntime"
    assert torch.equal(pool(cl), theirs)


def test_the_gate_ops_refuse_what_they_cannot_compute() -> None:
    with pytest.raises(ConfigError, match=r"global pooling"):
        QuantAdaptiveAvgPool2d((2, 2), arithmetic="onnxruntime")
    with pytest.raises(InputError, match="uint8"):
        QuantMul.from_qparams((0.1, 3), (0.2, 4), (0.3, 5))(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 1, 1))


def test_the_integer_form_computes_the_reference_tables_and_products(effnet, onnxruntime_run, tmp_path: Path) -> None:
    """Default arithmetic, ``form="integer"``: tables as GatherElements, products as a Gather of
    their code-pair table, so onnxruntime computes what the reference lowering computes."""
    model, x, cal = effnet
    result = fxcompress.run(model, FOLD + [("lower", {"backend": "reference"})], (x,), calibration_data=cal,
                            progress=False)
    theirs, ops = onnxruntime_run(fxcompress.export_onnx(result, tmp_path / "i.onnx", form="integer"), x)
    assert ops["GatherElements"] == 65 and ops["Gather"] >= 16 and ops["QLinearMul"] == 0
    with torch.inference_mode():
        ours = result.model(x)
    assert torch.allclose(theirs, ours, rtol=1e-5, atol=1e-5 * float(ours.abs().max()))
