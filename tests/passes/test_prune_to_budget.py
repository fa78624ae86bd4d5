"""prune_to_budget: greedy per-group pruning to a MACs / params / latency budget on the digits task."""

from __future__ import annotations

import pytest
import torch

import fxcompress
from fxcompress.errors import ConfigError
from fxcompress.examples.digits import accuracy, load_digits_data, pretrained_digits_cnn
from fxcompress.macs import count_macs
from fxcompress.report import weight_count

DATA = load_digits_data(0)
PAIRS = [(DATA.train_x[i * 64:(i + 1) * 64], DATA.train_y[i * 64:(i + 1) * 64]) for i in range(4)]
EXAMPLE = DATA.train_x[:2]
MODEL = pretrained_digits_cnn()
FLOAT = fxcompress.trace(MODEL, EXAMPLE)


def _eval(model) -> float:
    return accuracy(model, DATA.test_x, DATA.test_y)


def _run(options: dict, eval_fn=_eval) -> fxcompress.Result:
    return fxcompress.run(MODEL, [("prune_to_budget", options)], EXAMPLE, calibration_data=PAIRS, eval_fn=eval_fn,
                          progress=False)


def test_macs_budget_met_and_better_than_uniform_at_equal_macs() -> None:
    result = _run({"target": "macs", "keep": 0.5})
    stats = result.report.rows[0].stats
    macs = count_macs(result.model)
    assert stats["met"] and macs <= 0.5 * count_macs(FLOAT) and stats["after"] == macs
    assert len(set(stats["group_ratios"].values())) > 1  # groups pruned to different ratios
    assert result.model(EXAMPLE).shape == MODEL(EXAMPLE).shape
    uniform = fxcompress.run(MODEL, [("prune_channels", {"ratio": 0.3})], EXAMPLE, progress=False).model
    assert count_macs(uniform) <= macs  # the uniform ratio giving no more MACs
    # measured: 91.6 % greedy vs 66.3 % uniform (no fine-tuning)
    assert _eval(result.model) > _eval(uniform) + 5.0


def test_params_budget_with_the_sqnr_metric_and_distillation_between_steps() -> None:
    result = _run({"target": "params", "keep": 0.6, "finetune_steps": 5, "step": 0.25}, eval_fn=None)
    stats = result.report.rows[0].stats
    assert stats["met"] and weight_count(result.model) <= 0.6 * weight_count(FLOAT)
    assert stats["metric"]["kind"] == "output SQNR (dB)" and stats["metric"]["end"] < stats["metric"]["start"]


def test_latency_budget_uses_a_cached_table(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FXCOMPRESS_CACHE_DIR", str(tmp_path))
    result = _run({"target": "latency", "keep": 0.7, "step": 0.25})
    stats = result.report.rows[0].stats
    assert stats["after"] <= 0.7 * stats["before"] or not stats["met"]
    table = (tmp_path / "latency.json").read_text()
    assert "Conv2d|16|16|(3, 3)" in table and "linear|128|64" in table


def test_an_unmeetable_budget_is_reported_as_missed() -> None:
    result = _run({"target": "macs", "keep": 0.01, "step": 0.5, "max_ratio": 0.5})
    stats = result.report.rows[0].stats
    assert not stats["met"] and stats["ratio"] > 0.01
    assert any("budget MISSED" in n for n in result.report.notes)


@pytest.mark.parametrize("options, message", [
    ({"target": "flops"}, "target"), ({"keep": 1.5}, "keep"), ({"strategy": "random"}, "strategy"),
    ({"importance": "taylor"}, "importance"), ({"distill": "ce"}, "distill"),
])
def test_bad_options(options, message) -> None:
    with pytest.raises(ConfigError, match=message):
        _run(options)


def test_refuses_a_quantized_graph() -> None:
    observed = fxcompress.run(MODEL, ["insert_observers"], EXAMPLE).model
    with pytest.raises(ConfigError, match="prune first"):
        fxcompress.run(observed, [("prune_to_budget", {})], EXAMPLE, calibration_data=PAIRS, progress=False)
    assert torch.equal(MODEL.fc1.weight, FLOAT.fc1.weight)
