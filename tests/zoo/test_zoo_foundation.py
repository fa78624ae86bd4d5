"""The torchvision classification zoo through fuse_conv_bn + eliminate_dead_nodes, fully checked.

Every model is built with realistic random weights (``fxcompress.zoo``), traced,
and run through both Foundation passes under ``check="full"`` (the conftest
default).  The compressed model must give the same outputs (norm-relative
1e-4), leave no foldable BatchNorm and no eval-mode no-op module behind, and
the caller's model must be exactly as it was.  CI runs the models up to 30M
parameters at reduced resolution; all 80 at full resolution are marked slow.

Deep nets amplify float32 round-off: with these weights the float32 forward
of resnet101 at 224 px is itself 7e-5 away from its float64 forward, and two
float32 computations of the same function (unfused and fused) differ by about
sqrt(2) times that.  So the tolerance is 1e-4 or three times the model's own
float32 error, whichever is larger, and the fused model must also be that
close to the float64 answer: fusion may not cost accuracy, only round-off.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import fx, nn

import fxcompress
from fxcompress import zoo
from fxcompress.api import state_hash
from fxcompress.ops import Kind, describe

TOL = 1e-4
PIPELINE = ["fuse_conv_bn", "eliminate_dead_nodes"]
_BN = nn.modules.batchnorm._BatchNorm
_NO_OPS = (nn.Identity, nn.modules.dropout._DropoutNd)

CASES = [pytest.param(name, True, id=f"{name}-reduced") for name in zoo.ci_subset()] + [
    pytest.param(name, False, id=name, marks=pytest.mark.slow) for name in zoo.list_classifiers()
]


def _fingerprint(model: nn.Module) -> tuple[str, list[tuple[str, type, bool]]]:
    """Everything run() promises not to touch: state (hashed, bit-exact), structure, training flags."""
    return state_hash(model), [(name, type(m), m.training) for name, m in model.named_modules()]


def _foldable_bns(gm: fx.GraphModule) -> list[str]:
    """BatchNorm nodes that still directly follow a single-user conv or linear module."""
    left = []
    for node in gm.graph.nodes:
        info = describe(node, gm)
        if info.kind is Kind.NORM and info.op == "batch_norm" and isinstance(info.inputs[0], fx.Node):
            src = describe(info.inputs[0], gm)
            if src.kind in (Kind.CONV, Kind.LINEAR) and src.module is not None and len(src.node.users) == 1:
                left.append(node.name)
    return left


@pytest.mark.parametrize(("name", "reduced"), CASES)
def test_foundation_passes_on_the_zoo(name: str, reduced: bool, rel_err) -> None:
    model = zoo.build(name)
    x = zoo.example_input(name, batch=2, reduced=reduced)
    before = _fingerprint(model)
    with torch.no_grad():
        expected = model(x)
        exact = copy.deepcopy(model).double()(x.double())
    tolerance = max(TOL, 3 * rel_err(exact, expected))

    result = fxcompress.run(model, PIPELINE, x, tolerance=tolerance)
    gm = result.model
    with torch.no_grad():
        got = gm(x)

    assert rel_err(expected, got) <= tolerance
    assert rel_err(exact, got) <= tolerance
    fuse, _ = result.report.rows
    if any(isinstance(m, _BN) for m in model.modules()):
        assert fuse.modified and fuse.stats["fused"] > 0
        assert result.report.after.state_bytes < result.report.before.state_bytes
    assert not _foldable_bns(gm)
    assert not [n.target for n in gm.graph.nodes
                if n.op == "call_module" and isinstance(gm.get_submodule(n.target), _NO_OPS)]
    assert not [m for m in gm.modules() if isinstance(m, _NO_OPS)], "no-op modules are deleted"
    assert _fingerprint(model) == before, "the caller's model must be left exactly as it was"
