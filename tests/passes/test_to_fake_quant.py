"""to_fake_quant: observers become fake-quant modules that predict the quantized model and train.

The trained digits CNN on scikit-learn's digits images.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcompress
from fxcompress.errors import ConfigError
from fxcompress.examples.digits import load_digits_data, pretrained_digits_cnn
from fxcompress.quant.activations import ActivationFakeQuant, ActivationObserver
from fxcompress.quant.layers import FakeQuantLayer, ObservedLayer
from fxcompress.verify import stage_of

DATA = load_digits_data(0)
CALIBRATION = [DATA.train_x[i * 32:(i + 1) * 32] for i in range(4)]
EXAMPLE = DATA.train_x[:2]
OBSERVE = ["fuse_conv_bn", "insert_observers", "calibrate"]


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    return 10 * math.log10(reference.pow(2).sum().item() / (reference - approximation).pow(2).sum().item())


def _run(pipeline: list, model: nn.Module | None = None) -> fxcompress.Result:
    return fxcompress.run(model or pretrained_digits_cnn(), pipeline, EXAMPLE, calibration_data=CALIBRATION)


def test_every_observer_becomes_fake_quant_with_the_calibrated_qparams() -> None:
    observed = _run(OBSERVE).model
    result = _run(OBSERVE + ["to_fake_quant"])
    gm = result.model
    row = result.report.rows[-1]
    assert row.modified and row.stats == {"layers": 6, "activations": 6}
    assert stage_of(gm) == "fake_quant"
    assert not [name for name, m in gm.named_modules() if m.training]
    assert not any(isinstance(m, (ObservedLayer, ActivationObserver)) for m in gm.modules())
    for path, module in observed.named_modules():
        if isinstance(module, (ObservedLayer, ActivationObserver)):
            fq = gm.get_submodule(path)
            assert isinstance(fq, (FakeQuantLayer, ActivationFakeQuant))
            for a, b in zip(fq.qparams(), module.qparams()):
                assert torch.equal(a, b)


def test_outputs_become_the_quantized_models_and_stay_close_to_float() -> None:
    model = pretrained_digits_cnn()
    with torch.no_grad():
        reference = model(DATA.test_x)
        fake = _run(OBSERVE + ["to_fake_quant"], model).model(DATA.test_x)
    assert not torch.equal(fake, reference)
    assert sqnr_db(reference, fake) > 25


def test_gradients_reach_weights_and_learnable_scales() -> None:
    gm = _run(OBSERVE + [("to_fake_quant", {"learnable_scale": True})]).model
    loss = F.cross_entropy(gm(DATA.train_x[:32]), DATA.train_y[:32])
    loss.backward()
    layer = gm.get_submodule("conv.0")
    assert layer.module.weight.grad is not None and layer.module.weight.grad.abs().sum() > 0
    assert isinstance(layer.weight_fake_quant.scale, nn.Parameter)
    assert layer.weight_fake_quant.scale.grad is not None and layer.weight_fake_quant.scale.grad.abs().sum() > 0
    activation = next(m for m in gm.modules() if isinstance(m, ActivationFakeQuant))
    assert activation.fake_quant.scale.grad is not None


def test_fixed_scales_by_default() -> None:
    gm = _run(OBSERVE + ["to_fake_quant"]).model
    assert not any(isinstance(m.fake_quant.scale, nn.Parameter)
                   for m in gm.modules() if isinstance(m, ActivationFakeQuant))
    gm(DATA.train_x[:32]).sum().backward()
    assert gm.get_submodule("fc1").weight.grad is not None


def test_unfolded_batchnorm_is_refused() -> None:
    with pytest.raises(ConfigError, match="run fuse_conv_bn before insert_observers"):
        _run(["insert_observers", "calibrate", "to_fake_quant"])


def test_requires_calibration() -> None:
    with pytest.raises(ConfigError, match=r"'to_fake_quant'.*requires \['calibrate'\]"):
        _run(["fuse_conv_bn", "insert_observers", "to_fake_quant"])
