"""mixed_precision: per-layer precisions to a metric-drop or size budget on the real digits task."""

from __future__ import annotations

import pytest
import torch

import fxcompress
from fxcompress.errors import ConfigError, MetricError
from fxcompress.examples.digits import accuracy, load_digits_data, pretrained_digits_cnn
from fxcompress.quant.layers import FoldedLayer
from fxcompress.report import state_bytes
from fxcompress.budget import clear_memory_cache

DATA = load_digits_data(0)
PAIRS = [(DATA.train_x[i * 64:(i + 1) * 64], DATA.train_y[i * 64:(i + 1) * 64]) for i in range(4)]
EXAMPLE = DATA.train_x[:2]
MODEL = pretrained_digits_cnn()


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FXCOMPRESS_CACHE_DIR", str(tmp_path))
    clear_memory_cache()


def _eval(model) -> float:
    return accuracy(model, DATA.test_x, DATA.test_y)


def _run(options: dict, eval_fn=_eval, tail=()) -> fxcompress.Result:
    return fxcompress.run(MODEL, ["fuse_conv_bn", ("mixed_precision", options), *tail], EXAMPLE,
                          calibration_data=PAIRS, eval_fn=eval_fn, progress=False)


def test_smallest_model_within_the_drop() -> None:
    result = _run({"max_drop": 0.5}, tail=[("lower", {"backend": "reference"}), "eliminate_dead_nodes"])
    stats = result.report.rows[1].stats
    assert stats["budget"]["met"] and stats["metric"]["drop"] <= 0.5
    assert _eval(MODEL) - _eval(result.model) <= 0.5
    precision = stats["precision"]
    assert set(precision) == {"stem.0", "branch.0", "branch.3", "conv.0", "fc1", "fc2"}
    assert precision["fc1"] == "int4"  # the largest layer, and not sensitive
    assert stats["bytes"]["after"] < 0.2 * stats["bytes"]["float"]
    # each probe is a real build: the last trial is the returned configuration
    assert stats["bytes"]["after"] in [t["bytes"] for t in stats["trials"]]


def test_size_budget_takes_the_first_configuration_that_fits() -> None:
    float_bytes = state_bytes(fxcompress.trace(MODEL, EXAMPLE))
    result = _run({"max_bytes": int(0.25 * float_bytes)})
    stats = result.report.rows[1].stats
    assert stats["budget"]["met"] and stats["bytes"]["after"] <= 0.25 * float_bytes
    folded = [m for m in result.model.modules() if isinstance(m, FoldedLayer)]
    assert folded and {m.spec.bits for m in folded} <= {8, 4}


def test_an_unmeetable_budget_returns_the_closest_model_reported_as_missed() -> None:
    result = _run({"max_bytes": 100})
    stats = result.report.rows[1].stats
    assert not stats["budget"]["met"]
    assert set(stats["precision"].values()) == {"int4"}  # the smallest there is
    assert any("budget MISSED" in n for n in result.report.notes)


def test_int8_only_choice_and_layers_kept_float() -> None:
    result = _run({"max_drop": 1.0, "choices": ("float", "int8")})
    assert set(result.report.rows[1].stats["precision"].values()) <= {"float", "int8"}

    class WeightNormed(torch.nn.Module):  # a computed weight: no module owns it, nothing quantizes it
        def __init__(self) -> None:
            super().__init__()
            self.v = torch.nn.Parameter(torch.randn(16, 64) / 8)

        def forward(self, x):
            return torch.nn.functional.linear(x, self.v / self.v.norm(dim=1, keepdim=True))

    model = torch.nn.Sequential(torch.nn.Flatten(), WeightNormed(), torch.nn.ReLU(),
                                torch.nn.Linear(16, 10)).eval()
    with pytest.raises(ConfigError, match=r"layer 'linear' can take none of the precisions"):
        fxcompress.run(model, ["fuse_conv_bn", ("mixed_precision", {"max_bytes": 1000, "choices": ("int8",)})],
                       EXAMPLE, calibration_data=PAIRS, progress=False)


def test_eval_fn_returning_nan_or_text() -> None:
    for value in (float("nan"), "high"):
        with pytest.raises(MetricError, match="eval_fn returned"):
            _run({"max_drop": 0.5}, eval_fn=lambda m, v=value: v)


@pytest.mark.parametrize("options, message", [
    ({}, "exactly one budget"), ({"max_drop": 0.5, "max_bytes": 10}, "exactly one budget"),
    ({"max_drop": -1.0}, "max_drop"), ({"max_bytes": 10, "choices": ("float",)}, "choices"),
])
def test_bad_options(options, message) -> None:
    with pytest.raises(ConfigError, match=message):
        _run(options)


def test_max_drop_needs_eval_fn() -> None:
    with pytest.raises(ConfigError, match="eval_fn"):
        _run({"max_drop": 0.5}, eval_fn=None)


def _kernel_weight_bits() -> int:
    from fxcompress.quant.isa import int8_arithmetic

    return 8 if int8_arithmetic().exact_products else 7


@pytest.mark.skipif(not __import__("fxcompress.quant.kernels", fromlist=["x"]).onednn_int8_support(),
                    reason="max_latency times the model lowered for the x86 int8 kernels")
def test_latency_budget_takes_the_first_configuration_within_it() -> None:
    # A budget any configuration meets: the first one (all float) is taken, measured and reported.
    generous = _run({"max_latency": 10.0}, eval_fn=None)
    stats = generous.report.rows[1].stats
    assert stats["budget"]["met"] and set(stats["precision"].values()) == {"float"}
    assert stats["latency"]["after"] == stats["trials"][0]["seconds"] <= 10.0
    # One no configuration meets: the fastest end of the chain (every layer int8, never int4,
    # whose codes run on the same kernels), reported as missed.
    tight = _run({"max_latency": 1e-9}, eval_fn=None, tail=[("lower", {"backend": "x86"})])
    stats = tight.report.rows[1].stats
    assert not stats["budget"]["met"] and set(stats["precision"].values()) == {"int8"}
    assert any("budget MISSED (max_latency=1e-09)" in n for n in tight.report.notes)
    assert all(t["seconds"] > 0 for t in stats["trials"])
    # Its int8 weights are the ones this CPU's kernels run exactly: nothing takes the reference path.
    assert tight.report.rows[2].stats["fallbacks"] == []
    codes = [t for t in tight.model.state_dict().values() if t.dtype == torch.int8]
    assert codes and max(int(t.abs().max()) for t in codes) <= 2 ** (_kernel_weight_bits() - 1) - 1


@pytest.mark.parametrize("options, message", [
    ({"max_latency": 0.01, "max_bytes": 1000}, "give exactly one budget"),
    ({"max_latency": -1.0}, "max_latency must be a positive number of seconds"),
    ({"max_latency": float("nan")}, "max_latency must be a positive number of seconds"),
    ({"max_latency": 0.01, "choices": ("float", "int4")}, "max_latency needs 'int8' in choices"),
])
def test_bad_latency_budgets_are_config_errors(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _run(options, eval_fn=None)
