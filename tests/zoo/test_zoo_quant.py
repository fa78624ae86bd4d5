"""The torchvision classification zoo through static quantization, fully checked.

Every model (realistic random weights, ``fxcompress.zoo``) goes through
``fuse_conv_bn -> insert_observers -> calibrate -> fold_fake_quant`` under
``check="full"`` (the conftest default): each pass is linted, shape-checked and
stage-verified, and ``insert_observers``/``calibrate`` are declared exact, so
the manager checks that they leave the outputs unchanged.  The folded model must give finite outputs on a batch
it was not calibrated on, keep no float conv/linear weight that the report
does not list as kept float, and shrink its state.  The output SQNR against
the float model is recorded (``record_property``) for the zoo table.

SQNR floor: these models see N(0, 1) noise instead of images and random
weights, so their activations are not what trained models produce.  At the
reduced resolution every CI model measured at least 6 dB (RegNet-Y and the
deeper ResNets lowest, 6 to 8 dB; ResNet-18/34, EfficientNet, MobileNet-V3,
SqueezeNet and Swin 23 to 39 dB), so 5 dB is asserted there.  At full
resolution (slow) only "better than zero" is asserted (0 dB: the output is no
closer to the float one than zero is), since those figures are not tracked in
CI; benchmarks/vs_torch_ao.py compares real-image figures with torch.ao.  CI
runs the models up to 30M parameters at reduced resolution; all 80 at full
resolution are marked slow.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress import zoo
from fxcompress.quant.layers import FoldedLayer

PIPELINE = ["fuse_conv_bn", "insert_observers", "calibrate", "fold_fake_quant"]
CALIBRATION_BATCHES = 2
SQNR_FLOOR_DB = {True: 5.0, False: 0.0}  # by reduced resolution, see the module docstring

CASES = [pytest.param(name, True, id=f"{name}-reduced") for name in zoo.ci_subset()] + [
    pytest.param(name, False, id=name, marks=pytest.mark.slow) for name in zoo.list_classifiers()
]


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """10 log10(‖ref‖² / ‖ref − approx‖²)."""
    noise = (reference.double() - approximation.double()).pow(2).sum().item()
    signal = reference.double().pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


@pytest.mark.parametrize(("name", "reduced"), CASES)
def test_static_quantization_on_the_zoo(name: str, reduced: bool, record_property) -> None:
    model = zoo.build(name)
    batch = 2 if reduced else 4
    calibration = [zoo.example_input(name, batch=batch, reduced=reduced, seed=s + 1)
                   for s in range(CALIBRATION_BATCHES)]
    held_out = zoo.example_input(name, batch=batch, reduced=reduced, seed=100)
    with torch.no_grad():
        expected = model(held_out)

    result = fxcompress.run(model, PIPELINE, held_out[:1], calibration_data=calibration)
    gm = result.model
    with torch.no_grad():
        got = gm(held_out)

    assert torch.isfinite(got).all()
    sqnr = sqnr_db(expected, got)
    record_property("sqnr_db", round(sqnr, 2))
    assert sqnr > SQNR_FLOOR_DB[reduced], f"{name}: SQNR {sqnr:.2f} dB"

    observe, calibrate, fold = result.report.rows[1:]
    kept = set(observe.stats["kept_float"])
    assert calibrate.stats["batches"] == CALIBRATION_BATCHES
    folded = {path for path, m in gm.named_modules() if isinstance(m, FoldedLayer)}
    assert len(folded) == observe.stats["layers_quantized"] > 0
    float_layers = {path for path, m in gm.named_modules()
                    if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and m.weight is not None}
    assert float_layers <= kept, f"float layers not reported as kept float: {sorted(float_layers - kept)[:5]}"
    assert fold.stats["weight_bytes"]["after"] * 4 == fold.stats["weight_bytes"]["before"]  # int8 vs float32
    assert result.report.after.state_bytes < result.report.before.state_bytes
