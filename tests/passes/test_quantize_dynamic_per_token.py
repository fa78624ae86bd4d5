"""quantize_dynamic per token: each layer's zero point chosen from data, and sibling linears fused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress import artifact
from fxcompress.errors import ConfigError
from fxcompress.quant.lowered import DynamicQuantLinear
from fxcompress.quant.token_zero_point import SYMMETRIC, choose_zero_point

from _transformers import small_bert


class GeluMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up, self.act, self.down = nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


def zero_points(gm: nn.Module) -> dict[str, int]:
    return {path: m.token_zero_point for path, m in gm.named_modules() if isinstance(m, DynamicQuantLinear)}


def test_choose_zero_point_splits_the_codes_as_the_rows_need() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(500, 64, generator=gen)
    assert abs(choose_zero_point(x.amin(1), x.amax(1)) - 128) <= 16  # about symmetric rows
    g = nn.functional.gelu(x * 3)
    assert choose_zero_point(g.amin(1), g.amax(1)) <= 20  # mostly positive: few codes below zero
    assert choose_zero_point(x.abs().amin(1), x.abs().amax(1)) == 1  # never negative
    assert choose_zero_point(-x.abs().amax(1), -x.abs().amin(1)) == 254  # never positive
    assert choose_zero_point(torch.empty(0), torch.empty(0)) == SYMMETRIC


def test_auto_zero_points_follow_each_layers_inputs_and_cut_the_error() -> None:
    model, x = GeluMLP().eval(), torch.randn(16, 64)
    auto = fxcompress.run(model, [("quantize_dynamic", {"granularity": "per_token"})], (x,), progress=False)
    fixed = fxcompress.run(model, [("quantize_dynamic", {"granularity": "per_token", "token_zero_point": 128})],
                           (x,), progress=False)
    chosen, row = zero_points(auto.model), auto.report.rows[0]
    assert abs(chosen["up"] - 128) <= 30 and chosen["down"] <= 40  # after GELU the rows are nearly all positive
    assert row.stats["token_zero_points"] == {"up": chosen["up"], "down": chosen["down"]}
    assert any("per-token zero points from the example inputs" in note for note in row.stats["notes"])
    assert zero_points(fixed.model) == {"up": 128, "down": 128} and "token_zero_points" not in fixed.report.rows[0].stats
    test = torch.randn(64, 64)
    with torch.no_grad():
        expected = model(test)
        errors = [(r.model(test) - expected).square().sum().item() for r in (auto, fixed)]
    assert errors[0] < 0.8 * errors[1]


def test_zero_points_come_from_the_calibration_data_when_given() -> None:
    model, x = GeluMLP().eval(), torch.randn(4, 64)
    result = fxcompress.run(model, [("quantize_dynamic", {"granularity": "per_token"})], (x,),
                            calibration_data=[torch.randn(8, 64) for _ in range(3)], progress=False)
    assert any("from 3 calibration batches" in note for note in result.report.rows[0].stats["notes"])


@pytest.mark.parametrize("value", [0, 255, 1.5, "symmetric", True])
def test_a_bad_zero_point_is_a_config_error(value: object) -> None:
    with pytest.raises(ConfigError, match="token_zero_point"):
        fxcompress.run(GeluMLP(), [("quantize_dynamic", {"granularity": "per_token", "token_zero_point": value})],
                       (torch.randn(2, 64),), progress=False)
    with pytest.raises(ConfigError, match="token_zero_point"):
        DynamicQuantLinear(64, 8, granularity="per_token", token_zero_point=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("granularity", ["per_token", "per_tensor"])
def test_fused_siblings_are_bit_for_bit_the_separate_layers(granularity: str, tmp_path) -> None:
    model, ids = small_bert()
    options = {"granularity": granularity}
    fused = fxcompress.run(model, [("quantize_dynamic", options)], (ids,), check="full", progress=False)
    apart = fxcompress.run(model, [("quantize_dynamic", {**options, "fuse_siblings": False})], (ids,),
                           progress=False)
    assert fused.report.rows[0].stats["fused"]["layers.0.attention.query_key_value"] == [
        "layers.0.attention.query", "layers.0.attention.key", "layers.0.attention.value"]
    assert apart.report.rows[0].stats["fused"] == {}
    longer = ids.repeat(3, 2)[:, :40]  # another batch size and length
    for batch in (ids, longer):
        assert torch.equal(fused.model(batch), apart.model(batch))
    path = tmp_path / "fused.fxc"
    artifact.save(fused, path)
    assert torch.equal(artifact.load(path)(longer), fused.model(longer))


class Shared(nn.Module):
    """Linears reading one value that must not be fused: one is called twice, the others
    live under different parents."""

    def __init__(self) -> None:
        super().__init__()
        self.twice, self.once = nn.Linear(16, 16), nn.Linear(16, 16)
        self.left, self.right = nn.Sequential(nn.Linear(16, 8)), nn.Sequential(nn.Linear(16, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.twice(x) + self.once(x) + self.twice(x * 2)
        return torch.cat([self.left(y), self.right(y)], -1)


def test_siblings_called_twice_or_under_other_parents_are_not_fused() -> None:
    model, x = Shared().eval(), torch.randn(5, 16)
    result = fxcompress.run(model, [("quantize_dynamic", {"granularity": "per_token"})], (x,), progress=False)
    assert result.report.rows[0].stats["fused"] == {}
    assert sorted(zero_points(result.model)) == ["left.0", "once", "right.0", "twice"]
