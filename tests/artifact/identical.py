"""``assert_identical``: a loaded model is the saved one, bit for bit, and stays so when run."""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
from torch import fx
from torch.utils import _pytree as pytree

__all__ = ["assert_identical", "assert_same_state"]


def assert_same_state(expected: torch.nn.Module, got: torch.nn.Module) -> None:
    """Same state_dict: names, dtypes, shapes, values; parameters with the same requires_grad."""
    want, have = expected.state_dict(keep_vars=True), got.state_dict(keep_vars=True)
    assert want.keys() == have.keys()
    for key, t in want.items():
        r = have[key]
        assert (r.dtype, r.shape) == (t.dtype, t.shape), key
        assert torch.equal(r.detach(), t.detach()), key
        assert isinstance(r, torch.nn.Parameter) == isinstance(t, torch.nn.Parameter), key
        assert r.requires_grad == t.requires_grad, key


def _leaves(gm: fx.GraphModule) -> list[str]:
    return sorted({str(n.target) for n in gm.graph.nodes if n.op == "call_module"})


def assert_identical(gm: fx.GraphModule, loaded: fx.GraphModule, inputs: Sequence[Sequence[Any]]) -> None:
    """``loaded`` equals ``gm``: graph, leaf types and reprs (specs, flags), state, training flags,
    and the outputs and state after running each input tuple of ``inputs`` on both in turn
    (run on copies: observers record what they see, so the state must also evolve identically)."""
    assert [(n.op, n.name, str(n.target), str(n.args)) for n in loaded.graph.nodes] == \
        [(n.op, n.name, str(n.target), str(n.args)) for n in gm.graph.nodes]
    for path in _leaves(gm):
        mine, theirs = gm.get_submodule(path), loaded.get_submodule(path)
        assert [(n, type(m)) for n, m in theirs.named_modules()] == [(n, type(m)) for n, m in mine.named_modules()]
        assert repr(theirs) == repr(mine), path
    assert_same_state(gm, loaded)
    assert {p: m.training for p, m in loaded.named_modules()} == \
        {p: gm.get_submodule(p).training for p, _ in loaded.named_modules()}
    a, b = copy.deepcopy(gm), copy.deepcopy(loaded)
    for args in inputs:
        out_a = a(*[x.clone() for x in args])
        out_b = b(*[x.clone() for x in args])
        leaves_a, leaves_b = pytree.tree_leaves(out_a), pytree.tree_leaves(out_b)
        assert len(leaves_a) == len(leaves_b)
        assert all(torch.equal(x, y) for x, y in zip(leaves_a, leaves_b))
        assert all(float(x.detach().float().std()) > 1e-4 for x in leaves_a if x.numel() > 1)  # not degenerate
    assert_same_state(a, b)
