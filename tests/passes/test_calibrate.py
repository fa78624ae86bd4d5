"""calibrate: qparams from the data (closed form with min/max observers), batch forms, errors.

Data are scikit-learn's digits images; the model is the trained digits CNN.
"""

from __future__ import annotations

from typing import Iterator

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.errors import CalibrationError, ConfigError
from fxcompress.examples.digits import load_digits_data, pretrained_digits_cnn
from fxcompress.quant import QuantSpec, compute_qparams
from fxcompress.quant.activations import ActivationObserver

DATA = load_digits_data(0)
BATCHES = [DATA.train_x[i * 16:(i + 1) * 16] for i in range(4)]
EXAMPLE = DATA.train_x[:2]
MINMAX = {"bits": 8, "signed": False, "symmetric": False, "observer": "minmax"}
PIPELINE = ["fuse_conv_bn", ("insert_observers", {"activations": MINMAX}), "calibrate"]


def _calibrated(data, pipeline=PIPELINE, model: nn.Module | None = None, **kwargs) -> fxcompress.Result:
    return fxcompress.run(model or pretrained_digits_cnn(), pipeline, EXAMPLE, calibration_data=data, **kwargs)


def _input_observer(result: fxcompress.Result) -> ActivationObserver:
    return result.model.get_submodule("fxc_act.x")


def test_qparams_are_those_of_the_data_range() -> None:
    result = _calibrated(BATCHES)
    data = torch.cat(BATCHES)
    scale, zero_point = compute_qparams(data.min(), data.max(), QuantSpec(**MINMAX))
    observer = _input_observer(result)
    assert observer.calibrated
    torch.testing.assert_close(observer.scale, scale, rtol=0, atol=0)
    assert torch.equal(observer.zero_point, zero_point)
    row = result.report.rows[-1]
    assert row.modified and row.stats == {"batches": 4, "samples": 64, "observers": 6}
    assert all(m.calibrated for m in result.model.modules() if isinstance(m, ActivationObserver))


def test_outputs_are_unchanged_and_the_observers_stay_usable() -> None:
    model = pretrained_digits_cnn()
    fused = fxcompress.run(model, ["fuse_conv_bn"], EXAMPLE).model
    gm = _calibrated(BATCHES, model=model).model
    with torch.no_grad():
        torch.testing.assert_close(gm(DATA.test_x), fused(DATA.test_x), rtol=0, atol=0)
    # State written under inference_mode was made normal: later passes may update it.
    observer = _input_observer(_calibrated(BATCHES)).observer
    assert not any(b.is_inference() for b in observer.buffers())


def test_calibrating_in_a_later_run() -> None:
    observed = fxcompress.run(pretrained_digits_cnn(), PIPELINE[:2], EXAMPLE).model
    later = fxcompress.run(observed, ["calibrate"], EXAMPLE, calibration_data=BATCHES)
    reference = _input_observer(_calibrated(BATCHES))
    assert torch.equal(_input_observer(later).scale, reference.scale)


def test_num_batches_limits_the_data() -> None:
    result = _calibrated(BATCHES, pipeline=PIPELINE[:2] + [("calibrate", {"num_batches": 2})])
    assert result.report.rows[-1].stats["batches"] == 2
    scale, _ = compute_qparams(torch.cat(BATCHES[:2]).min(), torch.cat(BATCHES[:2]).max(), QuantSpec(**MINMAX))
    torch.testing.assert_close(_input_observer(result).scale, scale, rtol=0, atol=0)


def test_labelled_pairs_and_tuples_give_the_same_qparams() -> None:
    plain = _input_observer(_calibrated(BATCHES))
    labels = [DATA.train_y[i * 16:(i + 1) * 16] for i in range(4)]
    pairs = _input_observer(_calibrated(list(zip(BATCHES, labels))))
    singles = _input_observer(_calibrated([(b,) for b in BATCHES]))
    for other in (pairs, singles):
        assert torch.equal(other.scale, plain.scale) and torch.equal(other.zero_point, plain.zero_point)


class Mixer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1) + bias)


def test_keyword_batches() -> None:
    example = {"x": EXAMPLE, "bias": torch.zeros(2, 64)}
    data = [{"x": b, "bias": torch.ones(len(b), 64)} for b in BATCHES]
    result = fxcompress.run(Mixer().eval(), ["insert_observers", "calibrate"], example, calibration_data=data)
    assert result.report.rows[-1].stats["samples"] == 64
    # The linear's input observer saw flatten(x) + 1.
    observer = next(m for m in result.model.modules() if isinstance(m, ActivationObserver))
    expected, _ = compute_qparams(0.0, float(torch.cat(BATCHES).max()) + 1, observer.spec)
    assert observer.scale <= expected  # the histogram range search may clip, never widen


def _watched(batches: list) -> tuple[Iterator, list[int]]:
    seen: list[int] = []

    def gen() -> Iterator:
        for i, b in enumerate(batches):
            seen.append(i)
            yield b
    return gen(), seen


def test_calibrating_before_observers_exist_is_refused_before_any_work() -> None:
    data, seen = _watched(BATCHES)
    with pytest.raises(ConfigError, match=r"'calibrate'.*requires \['insert_observers'\]"):
        _calibrated(data, pipeline=["fuse_conv_bn", "calibrate"])
    assert seen == []


def test_missing_data_is_refused_before_any_work() -> None:
    data, seen = _watched(BATCHES)
    with pytest.raises(ConfigError, match=r"pass 'calibrate' \(entry 2\) needs calibration_data: give "):
        _calibrated(None)
    with pytest.raises(ConfigError, match=r"one-shot iterator \(generator\), but passes \['calibrate', "
                                          r"'calibrate'\] each read it"):
        _calibrated(data, pipeline=PIPELINE + ["calibrate"])
    assert seen == []


@pytest.mark.parametrize("data", [5, torch.zeros(4, 1, 8, 8), "batches.pt"])
def test_data_that_is_not_an_iterable_of_batches_is_refused_before_any_work(data) -> None:
    with pytest.raises(ConfigError, match=r"calibration_data must be an iterable of batches"):
        _calibrated(data)


def test_empty_data() -> None:
    with pytest.raises(CalibrationError, match="empty"):
        _calibrated([])


def test_calibration_batches_are_not_written_into() -> None:
    class Halves(nn.Module):  # normalises its input in place
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.div_(2).flatten(1))

    batches = [b.clone() for b in BATCHES]
    fxcompress.run(Halves().eval(), ["insert_observers", "calibrate"], EXAMPLE.clone(), calibration_data=batches)
    assert all(torch.equal(a, b) for a, b in zip(batches, BATCHES))


def test_a_half_precision_model_is_refused_before_any_work() -> None:
    with pytest.raises(ConfigError, match=r"pass 'calibrate' quantizes float32 models, but the model's "
                                          r"'.*' is float16: convert the model and inputs with .float\(\)"):
        _calibrated(BATCHES, model=pretrained_digits_cnn().half())


def test_nan_in_the_data_names_the_batch() -> None:
    bad = [b.clone() for b in BATCHES]
    bad[2][3, 0, 4, 4] = float("nan")
    with pytest.raises(CalibrationError, match="batch 2: input #0 contains NaN"):
        _calibrated(bad)


@pytest.mark.parametrize("batch, message", [
    (torch.zeros(16, 1, 7, 8), r"batch 1: input #0 is float32 \(16, 1, 7, 8\), expected float32 \(N, 1, 8, 8\)"),
    (torch.zeros(16, 64), r"batch 1: input #0 is float32 \(16, 64\)"),
    (torch.zeros(16, 1, 8, 8, dtype=torch.float64), r"batch 1: input #0 is float64"),
    ((torch.zeros(16, 1, 8, 8),) * 3, "batch 1 has 3 positional inputs"),
])
def test_a_batch_of_the_wrong_shape_or_dtype(batch, message: str) -> None:
    with pytest.raises(CalibrationError, match=message):
        _calibrated([BATCHES[0], batch])


class ExpNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(64, 16), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.exp(self.first(x.flatten(1))))


def test_inf_inside_the_model_names_the_node() -> None:
    # Finite data that overflows exp() inside the model.
    with pytest.raises(CalibrationError, match="batch 1: .*observer at 'exp'.*NaN or Inf"):
        fxcompress.run(ExpNet().eval(), ["insert_observers", "calibrate"], EXAMPLE,
                       calibration_data=[BATCHES[0], BATCHES[1] * 1e4])


def test_nothing_to_do_without_activation_observers() -> None:
    result = _calibrated(None, pipeline=["fuse_conv_bn", ("insert_observers", {"activations": None}), "calibrate"])
    row = result.report.rows[-1]
    assert not row.modified and row.stats["batches"] == 0


def test_bad_num_batches() -> None:
    with pytest.raises(ConfigError, match="num_batches"):
        _calibrated(BATCHES, pipeline=PIPELINE[:2] + [("calibrate", {"num_batches": 0})])
