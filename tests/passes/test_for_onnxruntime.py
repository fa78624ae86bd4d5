"""Building a model for onnxruntime's QDQ kernels: separate residual adds and int32 biases.

``insert_observers(residual_adds="separate")`` quantizes conv outputs before residual adds and
makes the adds uint8: the structure onnxruntime's QDQ fusion needs (QLinearConv + QLinearAdd),
instead of convs with x86's fused ``sum``. ``fold_fake_quant(int32_bias=True)`` puts biases on
the int32 accumulator grid, where onnxruntime keeps them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

import fxcompress
from fxcompress.errors import ConfigError
from fxcompress.quant.layers import FoldedLayer
from fxcompress.quant.lowered import QuantAdd
from fxcompress.quant.spec import portable_weight_spec

FOLD = ["fuse_conv_bn", ("insert_observers", {"weights": portable_weight_spec(), "residual_adds": "separate"}),
        "calibrate", "fold_fake_quant"]


@pytest.fixture(scope="module")
def resnet() -> tuple[torch.nn.Module, torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    gen = torch.Generator().manual_seed(1)
    return model, torch.randn(2, 3, 64, 64, generator=gen), [torch.randn(4, 3, 64, 64, generator=gen) for _ in range(2)]


def adds(gm: torch.nn.Module) -> int:
    return sum(isinstance(m, QuantAdd) for m in gm.modules())


def test_separate_adds_are_uint8_adds_and_reference_lowering_equals_the_folded_graph(resnet) -> None:
    model, x, cal = resnet
    folded = fxcompress.run(model, FOLD, (x,), calibration_data=cal, progress=False).model
    low = fxcompress.run(model, FOLD + [("lower", {"backend": "reference"})], (x,), calibration_data=cal,
                         progress=False)
    stats = low.report.rows[-1].stats
    # 8 residual adds: 7 feed a quantized consumer and become uint8 adds; the last one feeds the
    # float average pool and stays a float add of float conv outputs, as with fused adds.
    assert adds(low.model) == 7 and stats["int8_ops"]["add"] == 7
    with torch.inference_mode():
        assert torch.equal(low.model(x), folded(x))
    default = ["fuse_conv_bn", ("insert_observers", {"weights": portable_weight_spec()}), "calibrate",
               "fold_fake_quant", ("lower", {"backend": "reference"})]
    fused = fxcompress.run(model, default, (x,), calibration_data=cal, progress=False)
    assert adds(fused.model) == 0  # the default fuses every residual add into its conv


def test_separate_adds_follow_stochastic_depth() -> None:
    """EfficientNet's ``conv -> stochastic_depth -> add``: the eval-mode no-op keeps the conv's
    codes, so each of its 9 residual adds is a uint8 add too, and no conv fuses one."""
    torch.manual_seed(0)
    model = torchvision.models.efficientnet_b0(num_classes=10).eval()
    gen = torch.Generator().manual_seed(1)
    x, cal = torch.randn(1, 3, 64, 64, generator=gen), [torch.randn(2, 3, 64, 64, generator=gen)]
    folded = fxcompress.run(model, FOLD, (x,), calibration_data=cal, progress=False).model
    low = fxcompress.run(model, FOLD + [("lower", {"backend": "reference"})], (x,), calibration_data=cal,
                         progress=False).model
    assert adds(low) == 9 and not any(getattr(m, "residual", False) for m in low.modules())
    with torch.inference_mode():
        assert torch.equal(low(x), folded(x))


def test_separate_adds_export_to_qlinearconv_and_qlinearadd(resnet, onnxruntime_run, tmp_path: Path) -> None:
    model, x, cal = resnet
    result = fxcompress.run(model, FOLD + [("lower", {"only_if_faster": False}), "eliminate_dead_nodes"], (x,),
                            calibration_data=cal, progress=False)
    theirs, ops = onnxruntime_run(fxcompress.export_onnx(result, tmp_path / "sep.onnx", example_inputs=(x,)), x)
    assert ops["QLinearConv"] == 19 and ops["QLinearAdd"] == 7  # the last conv feeds the float add
    with torch.inference_mode():
        ours = result.model(x)
    assert torch.nn.functional.cosine_similarity(ours.flatten(), theirs.flatten(), dim=0) >= 0.99


def test_an_unknown_residual_adds_choice_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="residual_adds"):
        fxcompress.run(torchvision.models.resnet18(), [("insert_observers", {"residual_adds": "split"})],
                       (torch.randn(1, 3, 32, 32),), progress=False)


def test_int32_bias_puts_every_bias_on_its_accumulator_grid_and_lowering_follows(resnet) -> None:
    model, x, cal = resnet
    fold = [("fold_fake_quant", {"int32_bias": True}) if step == "fold_fake_quant" else step for step in FOLD]
    folded = fxcompress.run(model, fold, (x,), calibration_data=cal, progress=False)
    layers = [m for m in folded.model.modules() if isinstance(m, FoldedLayer) and m.bias is not None]
    assert folded.report.rows[-1].stats["int32_bias"] == len(layers) > 0
    for layer in layers:
        steps = layer.bias.detach() / (layer.input_scale * layer.weight_scale)
        assert torch.equal(steps, steps.round())
    low = fxcompress.run(model, fold + [("lower", {"backend": "reference"})], (x,), calibration_data=cal,
                         progress=False)
    with torch.inference_mode():
        assert torch.equal(low.model(x), folded.model(x))
    plain = fxcompress.run(model, FOLD, (x,), calibration_data=cal, progress=False).model
    with torch.inference_mode():  # the rounding moves outputs by a little, not nothing
        a, b = plain(x), folded.model(x)
    assert not torch.equal(a, b) and torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99
