"""FakeQuantize: exact forward, STE and LSQ gradients, switches, state, a QAT run."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from fxcompress.errors import CalibrationError, ConfigError
from fxcompress.quant import (
    FakeQuantize,
    MinMaxObserver,
    QuantSpec,
    default_activation_spec,
    default_weight_spec,
    dequantize,
    make_observer,
    quantize,
)

SPECS = [
    default_activation_spec(),
    default_weight_spec(),
    QuantSpec(bits=4, granularity="per_group", group_size=4, symmetric=False, signed=False),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.granularity)
@pytest.mark.parametrize("learnable", [False, True])
def test_forward_is_dequantize_of_quantize(spec: QuantSpec, learnable: bool) -> None:
    x = torch.randn(6, 8) * 2
    fq = FakeQuantize(spec, learnable=learnable)
    out = fq(x)
    scale, zp = fq.calculate_qparams()
    assert torch.equal(out, dequantize(quantize(x, scale, zp, fq.spec), scale, zp, fq.spec.axis))
    assert torch.equal(scale, fq.observer.calculate_qparams()[0])


def test_frozen_observer_keeps_the_qparams() -> None:
    fq = FakeQuantize(default_activation_spec().replace(observer="minmax"))
    fq(torch.rand(100))
    before = fq.calculate_qparams()
    fq.freeze_observer()
    fq(torch.rand(100) * 10)
    after = fq.calculate_qparams()
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    fq.enable_observer()
    fq(torch.rand(100) * 10)
    assert float(fq.calculate_qparams()[0]) > float(before[0])


def test_disabled_fake_quant_is_the_identity() -> None:
    fq = FakeQuantize(default_activation_spec()).enable_fake_quant(False)
    x = torch.randn(10)
    assert fq(x) is x
    assert fq.observer.has_data  # still observing


def test_ste_gradient_passes_inside_the_range_only() -> None:
    spec = QuantSpec(signed=True, symmetric=True)
    observer = MinMaxObserver(spec)
    observer(torch.tensor([-1.0, 1.0]))
    fq = FakeQuantize.from_observer(observer)
    scale = float(fq.calculate_qparams()[0])
    x = torch.tensor([-3.0, -0.5, 0.0, 0.3, 127 * scale, 128.6 * scale, 5.0], requires_grad=True)
    fq(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_learnable_scale_gets_the_lsq_gradient() -> None:
    spec = QuantSpec(bits=4, signed=True, symmetric=True)
    observer = MinMaxObserver(spec)
    observer(torch.tensor([-1.0, 1.0]))
    fq = FakeQuantize.from_observer(observer, learnable=True)
    assert isinstance(fq.scale, nn.Parameter)
    s = float(fq.scale.detach())
    x = torch.tensor([0.3, -0.55, 2.0, -3.0])
    fq(x).sum().backward()
    # LSQ: round(x/s) - x/s inside, qmax - zp / qmin - zp when clipped,
    # times 1 / sqrt(elements * qmax).
    v = x / s
    inside = (torch.round(v) - v)[:2].sum().item()
    expected = (inside + 7 - 8) / math.sqrt(4 * 7)
    assert fq.scale.grad is not None
    assert math.isclose(float(fq.scale.grad), expected, rel_tol=1e-5)


def test_per_channel_learnable_scale_trains_every_channel() -> None:
    observer = make_observer(default_weight_spec())
    w = torch.randn(5, 7)
    observer(w)
    fq = FakeQuantize.from_observer(observer, learnable=True)
    assert fq.scale.shape == (5,)
    (fq(w) - w).pow(2).sum().backward()
    assert fq.scale.grad.shape == (5,) and bool((fq.scale.grad != 0).all())


def test_missing_qparams_are_a_calibration_error() -> None:
    fq = FakeQuantize(default_activation_spec(), where="layer1.0.relu").freeze_observer()
    with pytest.raises(CalibrationError, match="'layer1.0.relu' has no qparams"):
        fq(torch.randn(3))
    with pytest.raises(CalibrationError, match="no data"):
        FakeQuantize.from_observer(make_observer(default_weight_spec()))


def test_observer_spec_must_match() -> None:
    with pytest.raises(ConfigError, match="does not match"):
        FakeQuantize(default_weight_spec(), make_observer(default_activation_spec()))


@pytest.mark.parametrize("learnable", [False, True])
def test_state_dict_round_trip_into_a_fresh_module(learnable: bool) -> None:
    spec = default_weight_spec()
    fq = FakeQuantize(spec, learnable=learnable)
    w = torch.randn(4, 3)
    fq(w)
    fresh = FakeQuantize(spec, learnable=learnable)
    fresh.load_state_dict(fq.state_dict())
    fresh.freeze_observer()
    assert torch.equal(fresh(w), fq.freeze_observer()(w))


def test_qat_on_digits_recovers_2_bit_accuracy() -> None:
    """Float-trained linear classifier on sklearn digits; 2-bit LSQ weights and
    8-bit inputs: fine-tuning beats post-training quantization."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    model = nn.Linear(64, 10)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(100):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    w_obs = make_observer(QuantSpec(bits=2, granularity="per_channel", observer="mse"))
    w_obs(model.weight)
    fq_w = FakeQuantize.from_observer(w_obs, learnable=True)
    fq_x = FakeQuantize(default_activation_spec().replace(observer="moving_average"))
    scale_before = fq_w.scale.detach().clone()

    def loss_and_accuracy() -> tuple[torch.Tensor, float]:
        logits = nn.functional.linear(fq_x(x), fq_w(model.weight), model.bias)
        return nn.functional.cross_entropy(logits, y), float((logits.argmax(1) == y).float().mean())

    ptq_loss, ptq_accuracy = loss_and_accuracy()
    optimizer = torch.optim.Adam([*model.parameters(), fq_w.scale], lr=0.01)
    for _ in range(50):
        optimizer.zero_grad()
        loss_and_accuracy()[0].backward()
        optimizer.step()
    fq_x.freeze_observer()
    qat_loss, qat_accuracy = loss_and_accuracy()
    assert float(qat_loss.detach()) < 0.6 * float(ptq_loss.detach())
    assert qat_accuracy > ptq_accuracy + 0.03
    assert not torch.equal(fq_w.scale.detach(), scale_before)
    # The qparams a fold would use reproduce the trained forward exactly.
    scale, zp = fq_w.calculate_qparams()
    folded = dequantize(quantize(model.weight, scale, zp, fq_w.spec), scale, zp)
    assert torch.equal(folded, fq_w(model.weight))


@pytest.mark.parametrize("learnable", [False, True])
def test_qparams_set_under_inference_mode_train_afterwards(learnable: bool) -> None:
    fq = FakeQuantize(default_weight_spec(), learnable=learnable)
    w = torch.randn(4, 6)
    with torch.inference_mode():
        fq(w)
    x = w.clone().requires_grad_()
    fq(x).sum().backward()
    assert x.grad is not None and (not learnable or fq.scale.grad is not None)
