"""``insert_observers(post_ops="tables")``: activations after convs as uint8 tables (``QuantTable``).

A conv or linear then fuses only the clamps onnxruntime's QLinearConv fuses (ReLU, ReLU6); SiLU,
hardswish, GELU, tanh and leaky ReLU after one are quantized at their input too and computed
on the codes as a table of 256 output codes: the folded graph's codes for every input code
(the reference lowering equals the folded graph bit for bit), exported as ONNX ``Gather``,
which onnxruntime computes exactly. On torchvision's EfficientNet-B0 (random init, 64 px).
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
from fxcompress.quant.lowered import Dequantize, QuantConvNd, Quantize, QuantTable
from fxcompress.quant.spec import portable_weight_spec

OBSERVE = {"weights": portable_weight_spec(), "residual_adds": "separate", "post_ops": "tables"}
FOLD = ["fuse_conv_bn", ("insert_observers", OBSERVE), "calibrate", "fold_fake_quant"]


@pytest.mark.parametrize("activation, args", [("swish", ()), ("hardswish", ()), ("gelu", ()), ("tanh", ()),
                                              ("leaky_relu", (0.1,))])
def test_a_table_computes_what_dequantize_then_quantize_with_the_activation_compute(activation, args) -> None:
    table = QuantTable.from_activation(activation, args, (0.043, 131), (0.021, 17))
    codes = torch.arange(256, dtype=torch.uint8).repeat(6).reshape(2, 3, 16, 16)
    codes = codes.contiguous(memory_format=torch.channels_last)
    expected = Quantize.from_qparams(0.021, 17, activation=activation, activation_args=args)(
        Dequantize.from_qparams(0.043, 131)(codes))
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
    tables = [m for m in low.model.modules() if isinstance(m, QuantTable)]
    # The stem, the 15 expand convs and the 16 squeeze-excitation fc1s: their SiLU output is
    # consumed quantized. The depthwise convs' feeds the float pool and gate product: fused.
    assert len(tables) == 32 and {t.activation for t in tables} == {"swish"}
    assert low.report.rows[-1].stats["int8_ops"]["table"] == 32
    assert not [m for m in low.model.modules()
                if isinstance(m, QuantConvNd) and m.output == "uint8" and m.post_op not in ("none", "relu", "hardtanh")]
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
    assert sum(isinstance(m, QuantTable) for m in loaded.modules()) == 32
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
    splits it) and every table a Gather; onnxruntime's codes are ours, so the outputs agree
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
    assert ops["QLinearConv"] == 3 and ops["Gather"] == 3  # the last conv has a float output
    with torch.inference_mode():
        ours = result.model(x)
    assert torch.allclose(theirs, ours, rtol=1e-5, atol=1e-5 * float(ours.abs().max()))


def test_an_unknown_post_ops_choice_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="post_ops"):
        fxcompress.run(torchvision.models.resnet18(), [("insert_observers", {"post_ops": "lookup"})],
                       (torch.randn(1, 3, 32, 32),), progress=False)
