"""equalize: exact in float, equal per-channel ranges, ReLU6 clamped per channel, depthwise pairs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress import zoo
from fxcompress.errors import ConfigError


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU6(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),  # depthwise
        nn.Conv2d(8, 16, 1), nn.Flatten(), nn.Linear(16 * 16, 10),
    ).eval()
    with torch.no_grad():  # channels of very different ranges, as after BatchNorm folding
        net[0].weight.mul_(torch.logspace(-2, 1, 8).reshape(-1, 1, 1, 1))
    return net


X = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(1))


def test_equalizes_ranges_exactly(rel_err) -> None:
    net = _net()
    result = fxcompress.run(net, ["equalize"], X)  # check="full": the exactness check runs
    stats = result.report.rows[0].stats
    assert stats["pairs"] == 2 and stats["relu6_clamps"] == 1
    before, after = (float(v) for v in stats["range_ratio"].split(" -> "))
    assert before > 100 and after < before / 10
    gm = result.model
    assert rel_err(net(X), gm(X)) < 1e-5
    r1 = gm.get_submodule("0").weight.abs().amax(dim=(1, 2, 3))
    r2 = gm.get_submodule("2").weight.abs().amax(dim=(1, 2, 3))
    torch.testing.assert_close(r1, r2, rtol=0.05, atol=0)  # depthwise pair: ranges equal per channel
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.relu in targets and torch.minimum in targets  # ReLU6 became relu + per-channel bound
    assert torch.equal(net[0].weight, _net()[0].weight)  # the caller's model is untouched


def test_relu6_skip_leaves_those_pairs_alone() -> None:
    result = fxcompress.run(_net(), [("equalize", {"relu6": "skip"})], X)
    assert result.report.rows[0].stats["pairs"] == 1


def test_mobilenet_v2_is_exact_and_quantizes_better_per_tensor(rel_err) -> None:
    model = zoo.build("mobilenet_v2", seed=0)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    fused = fxcompress.run(model, ["fuse_conv_bn"], x).model
    result = fxcompress.run(fused, ["equalize"], x)
    assert result.report.rows[0].stats["pairs"] > 30
    assert rel_err(fused(x), result.model(x)) < 1e-4
    per_tensor = {"weights": {"bits": 8, "granularity": "per_tensor"}, "activations": None}
    plain = fxcompress.run(fused, [("insert_observers", per_tensor), "calibrate", "fold_fake_quant"], x,
                           calibration_data=[x], check="shapes")
    eq = fxcompress.run(result.model, [("insert_observers", per_tensor), "calibrate", "fold_fake_quant"], x,
                           calibration_data=[x], check="shapes")
    # per-tensor weights are where equalization matters (measured: 0.17 vs 0.27 norm-relative error)
    assert rel_err(fused(x), eq.model(x)) < 0.8 * rel_err(fused(x), plain.model(x))


def test_bad_input() -> None:
    with pytest.raises(ConfigError, match="relu6"):
        fxcompress.run(_net(), [("equalize", {"relu6": "relu"})], X)
    observed = fxcompress.run(_net(), ["insert_observers"], X).model
    with pytest.raises(ConfigError, match="before insert_observers"):
        fxcompress.run(observed, ["equalize"], X)
