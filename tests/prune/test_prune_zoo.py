"""The CI zoo (<= 30M parameters, reduced resolution) through prune_channels, fully checked.

Per model: ratios 0.3 and 0.5 through ``fxcompress.run`` (output structure and
shapes kept, graph lints, every shape recorded is true, forward runs, fewer
parameters), and the exactness test: silence the channels to be removed, then
remove them, and the outputs must not move (1e-5, norm-relative) — for every
unit that does not pass a norm over the channel dim.  Ratio 0 is a no-op.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fxcompress
from fxcompress import zoo
from fxcompress.capture import trace
from fxcompress.passes.prune_channels import PruneChannels
from fxcompress.pass_base import PassContext
from fxcompress.prune import apply_removal, build_channel_graph, select, silence, unit_scores

QUICK = ("mobilenet_v3_small", "shufflenet_v2_x0_5", "squeezenet1_1")
RUNS = [pytest.param(name, ratio, id=f"{name}-{ratio}", marks=pytest.mark.slow)
        for name in zoo.ci_subset() for ratio in (0.3, 0.5)]
EXACT = [pytest.param(name, id=name, marks=() if name in QUICK else pytest.mark.slow) for name in zoo.ci_subset()]
# Reasons a CI-zoo unit may legitimately be frozen for: the classifier's outputs, and in Swin the
# attention function that derives its head dim from its input width and the relative position
# bias function that makes one channel per head.
EXPECTED_FROZEN = ("model output", "shifted_window_attention at node", "get_relative_position_bias at node")


@pytest.fixture(scope="module")
def models() -> dict:
    return {}


def _model(models: dict, name: str):
    if name not in models:
        models.clear()  # one model at a time: the zoo's big ones are memory hungry
        models[name] = (zoo.build(name), zoo.example_input(name, batch=2, reduced=True))
    return models[name]


@pytest.mark.parametrize("name, ratio", RUNS)
def test_zoo_prunes_with_full_checks(models, name, ratio):
    model, x = _model(models, name)
    result = fxcompress.run(model, [("prune_channels", {"ratio": ratio})], (x,))
    row = result.report.rows[0]
    assert row.modified and row.stats["removed_channels"] > 0
    assert row.after.parameters < result.report.before.parameters
    assert result.model(x).shape == model(x).shape
    assert all(any(e in reason for e in EXPECTED_FROZEN) for reason in row.stats["frozen"]), row.stats["frozen"]


@pytest.mark.parametrize("name", EXACT)
def test_zoo_pruning_silenced_channels_is_exact(models, name, rel_err):
    model, x = _model(models, name)
    gm = trace(copy.deepcopy(model), (x,))
    cg = build_channel_graph(gm)
    scores = unit_scores(gm, cg, "l2")
    assert not select(cg, scores, ratio=0.0).any()
    assert not PruneChannels(ratio=0.0)(gm, PassContext(example_args=(x,))).modified
    removed = select(cg, scores, ratio=0.5) & ~cg.norm_units
    assert removed.any()
    silence(gm, cg, removed)
    with torch.no_grad():
        reference = gm(x)
        apply_removal(gm, cg, removed)
        gm.recompile()
        assert rel_err(reference, gm(x)) < 1e-5
