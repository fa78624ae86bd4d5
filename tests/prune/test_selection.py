"""Selection: uniform, per-layer and global ratios, round_to, min_channels, frozen units."""

from __future__ import annotations

import pytest
import torch

from fxcompress import zoo
from fxcompress.capture import trace
from fxcompress.prune import build_channel_graph, select, unit_scores, unused_patterns


@pytest.fixture(scope="module")
def resnet18():
    gm = trace(zoo.build("resnet18"), (zoo.example_input("resnet18", reduced=True),))
    cg = build_channel_graph(gm)
    return cg, unit_scores(gm, cg, "l2")


def _group(cg, module):
    return next(g for g in cg.groups if module in g.modules)


def test_uniform_ratio_removes_the_least_important_of_every_group(resnet18):
    cg, scores = resnet18
    removed = select(cg, scores, ratio=0.5)
    for g in cg.groups:
        gone = removed[g.units]
        if g.frozen:
            assert not gone.any()  # the classifier's outputs
            continue
        assert int(gone.sum()) == len(g.units) // 2
        assert scores[g.units][gone].max() <= scores[g.units][~gone].min()


def test_round_to_keeps_multiples_rounding_up(resnet18):
    cg, scores = resnet18
    removed = select(cg, scores, ratio=0.3, round_to=8)
    for g in cg.groups:
        if not g.frozen:
            kept = int((~removed[g.units]).sum())
            assert kept % 8 == 0 and kept >= len(g.units) * 0.7


def test_min_channels_and_layer_ratios(resnet18):
    cg, scores = resnet18
    removed = select(cg, scores, ratio=0.95, min_channels=8, layer_ratios={"layer4.*": 0.25})
    layer4 = _group(cg, "layer4.0.conv1")
    assert int((~removed[layer4.units]).sum()) == 384  # 512 * 0.75
    layer1 = _group(cg, "layer1.0.conv1")
    assert int((~removed[layer1.units]).sum()) == 8
    assert unused_patterns(cg, {"layer4.*": 0.2, "decoder.*": 0.5}) == ["decoder.*"]


def test_global_ranking_respects_the_total_and_max_ratio(resnet18):
    cg, scores = resnet18
    removed = select(cg, scores, ratio=0.4, global_ranking=True, max_ratio=0.6)
    prunable_groups = [g for g in cg.groups if not g.frozen]
    total = sum(len(g.units) for g in prunable_groups)
    assert int(removed.sum()) == int(total * 0.4)
    fractions = [float(removed[g.units].float().mean()) for g in prunable_groups]
    assert max(fractions) <= 0.6 and min(fractions) < max(fractions)  # not uniform


def test_every_sliced_space_keeps_min_channels():
    """shufflenet: a block's second half is one unit per branch; it must never be emptied."""
    gm = trace(zoo.build("shufflenet_v2_x0_5"), (zoo.example_input("shufflenet_v2_x0_5", reduced=True),))
    cg = build_channel_graph(gm)
    scores = torch.arange(cg.n_units, dtype=torch.float64)  # arbitrary but fixed ranking
    removed = select(cg, scores, ratio=0.95, min_channels=2)
    gone = removed[cg.unit_of]
    for ps in cg.params.values():
        assert int((~gone[ps.ids]).sum()) >= 2, (ps.owner, ps.attr, ps.dim)
