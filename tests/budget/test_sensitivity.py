"""sensitivity(): entries against hand-applied changes, determinism, the cache, files, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

import fxcompress
from fxcompress.errors import ConfigError, MetricError
from fxcompress.examples.digits import accuracy, load_digits_data, pretrained_digits_cnn
from fxcompress.budget import OutputSQNR, clear_memory_cache

DATA = load_digits_data(0)
BATCHES = [DATA.train_x[i * 32:(i + 1) * 32] for i in range(3)]
EXAMPLE = DATA.train_x[:2]
MODEL = pretrained_digits_cnn()


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FXCOMPRESS_CACHE_DIR", str(tmp_path / "cache"))
    clear_memory_cache()


def _analyse(**kwargs):
    options = dict(calibration_data=BATCHES, quant=("int8", "int4"), prune_ratios=(0.25, 0.5), progress=False)
    options.update(kwargs)
    return fxcompress.sensitivity(MODEL, EXAMPLE, **options)


def test_every_layer_and_group_is_measured_and_int4_costs_more_than_int8() -> None:
    result = _analyse(cache=False)
    layers = result.layers()
    assert layers == ["stem.0", "branch.0", "branch.3", "conv.0", "fc1", "fc2"]
    for path in layers:
        int8, int4 = result.quant(path, "int8"), result.quant(path, "int4")
        assert 30 < int8.sqnr_db < 80 and int4.sqnr_db < int8.sqnr_db - 10  # 4 bits: ~24 dB less
        assert int4.saved["bytes"] > int8.saved["bytes"] > 0
    prune = [e for e in result.entries if e.kind == "prune"]
    assert {e.group for e in prune} == {0, 1, 2, 3}
    for group in {e.group for e in prune}:
        quarter, half = [e for e in prune if e.group == group]
        assert half.sqnr_db < quarter.sqnr_db and half.saved["macs"] > quarter.saved["macs"] > 0
    assert all(p.grad is None for p in MODEL.parameters())


def test_a_prune_entry_is_the_model_pruned_by_hand() -> None:
    result = _analyse(cache=False, quant=(), prune_ratios=(0.5,))
    entry = next(e for e in result.entries if e.target == "fc1")
    pruned = fxcompress.run(MODEL, [("prune_channels", {"ratio": 0.5, "layer_ratios": {"fc1": 0.5},
                                                        "scope": ["fc1", "fc2"]})], EXAMPLE).model
    reference = fxcompress.trace(MODEL, EXAMPLE)
    expected = OutputSQNR(reference, [((b,), {}) for b in BATCHES])(pruned)
    assert entry.sqnr_db == pytest.approx(expected, rel=1e-9)


def test_deterministic_and_a_second_call_is_free(tmp_path) -> None:
    calls = []

    def eval_fn(model):
        calls.append(1)
        return accuracy(model, DATA.test_x[:100], DATA.test_y[:100])

    first = _analyse(eval_fn=eval_fn)
    n = len(calls)
    assert n == 1 + len(first.entries) and not first.cached
    second = _analyse(eval_fn=eval_fn)
    assert second.cached and len(calls) == n  # nothing ran
    assert second.entries == first.entries
    clear_memory_cache()  # the disk cache answers too
    assert _analyse(eval_fn=eval_fn).entries == first.entries and len(calls) == n
    recomputed = _analyse(eval_fn=eval_fn, cache=False)
    assert recomputed.entries == first.entries  # deterministic
    assert first.baseline == accuracy(MODEL, DATA.test_x[:100], DATA.test_y[:100])
    assert all(e.drop == pytest.approx(first.baseline - e.metric) for e in first.entries)


def test_files_table_json_and_plots(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    result = _analyse(output_dir=tmp_path / "out")
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["sensitivity.json", "sensitivity.md", "sensitivity_groups.png", "sensitivity_layers.png"]
    data = json.loads((tmp_path / "out" / "sensitivity.json").read_text())
    assert len(data["entries"]) == len(result.entries)
    assert (tmp_path / "out" / "sensitivity_layers.png").read_bytes()[:4] == b"\x89PNG"
    assert "fc1" in (tmp_path / "out" / "sensitivity.md").read_text()


@pytest.mark.parametrize("value", [None, "99", float("nan"), float("inf")])
def test_eval_fn_must_return_a_finite_number(value) -> None:
    with pytest.raises(MetricError, match="eval_fn returned"):
        _analyse(eval_fn=lambda model: value, cache=False)


@pytest.mark.parametrize("options, message", [
    ({"quant": ("int3",)}, "quant"), ({"prune_ratios": (1.5,)}, "prune_ratios"),
    ({"importance": "taylor"}, "importance"), ({"calibration_data": []}, "empty"),
])
def test_bad_options(options, message) -> None:
    with pytest.raises(ConfigError, match=message):
        _analyse(**options)


def test_a_layer_no_precision_can_take_is_listed() -> None:
    class WeightNormed(torch.nn.Module):  # its weight is computed: no module owns it, nothing quantizes it
        def __init__(self) -> None:
            super().__init__()
            self.v = torch.nn.Parameter(torch.randn(16, 64) / 8)

        def forward(self, x):
            return torch.nn.functional.linear(x, self.v / self.v.norm(dim=1, keepdim=True))

    model = torch.nn.Sequential(torch.nn.Flatten(), WeightNormed(), torch.nn.ReLU(), torch.nn.Linear(16, 10)).eval()
    result = fxcompress.sensitivity(model, EXAMPLE, calibration_data=BATCHES, prune_ratios=(), progress=False)
    assert result.layers() == ["3"] and result.kept_float == {
        "linear": "functional call: the weight is not owned by a module"}
    assert math.isfinite(result.quant("3", "int8").sqnr_db)
