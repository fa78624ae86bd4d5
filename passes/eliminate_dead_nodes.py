"""``eliminate_dead_nodes``: drop eval-mode no-ops, unused nodes and the state nothing uses."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from fxcompress.ops import Kind, OpInfo, describe
from fxcompress.pass_base import Pass, PassContext, PassResult
from fxcompress.report import state_bytes

__all__ = ["EliminateDeadNodes"]

_REMOVALS = ("dead_nodes", "get_attr", "dropout", "identity", "contiguous", "clone", "arithmetic")


@dataclass(frozen=True)
class EliminateDeadNodes(Pass):
    """Removes what cannot affect the outputs -- eval-mode no-ops, unused nodes, and the
    submodules, parameters and buffers no node uses any more -- keeping every side effect,
    so outputs stay bit-for-bit what they were and the state shrinks.

    No-ops (bypassed, then erased): dropout that is not training (modules,
    ``F.dropout*`` and torchvision's ``stochastic_depth``), ``nn.Identity``,
    ``contiguous()`` on a tensor that already has row-major strides at every
    dim (a size-1 dim leaves the layout at other input sizes unknown, so it
    keeps the call), and copies -- ``clone()``, ``x*1``, ``1*x``, ``x+0``,
    ``0+x``, ``x-0``, ``x/1`` with a Python scalar and no further arguments,
    result shape and dtype equal to ``x``'s -- where neither ``x`` nor the copy,
    nor anything that may alias either, is written in place and the copy does
    not reach the graph output (callers may rely on owning what they get).

    Unused nodes are erased, except side effects: asserts and torch's impure
    ops, random ops (``torch.rand*``, dropout in training, ...), modules with
    ``mutates_args`` or a true ``fxc_impure`` attribute (also honoured on
    functions), and in-place writes -- unless the written tensor is a fresh
    value that nothing else reads.  Then every submodule, parameter, buffer and
    tensor attribute that no ``call_module``/``get_attr`` reaches is deleted
    (``state_bytes`` drops by ``bytes_freed``).  Only nodes and module paths in
    scope are touched.  Stats: a count per kind of removal that happened
    (``dead_nodes``, ``get_attr``, ``dropout``, ``identity``, ``contiguous``,
    ``clone``, ``arithmetic``, ``submodules``, ``parameters``, ``buffers``),
    ``bytes_freed``, and ``kept`` (reason -> count) for unused nodes that stayed.
    """

    name = "eliminate_dead_nodes"
    exact = True

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        bytes_before = state_bytes(gm)
        before = _state_census(gm)
        removed: Counter[str] = Counter()
        kept: Counter[str] = Counter()
        aliases = _AliasSets(gm)
        for node in list(gm.graph.nodes):
            found = _no_op(node, gm, aliases) if ctx.in_scope(node) else None
            if found is not None:
                kind, source = found
                node.replace_all_uses_with(source)
                aliases.union(node, source)
                gm.graph.erase_node(node)
                removed[kind] += 1
        for node in reversed(list(gm.graph.nodes)):
            if node.users or node.op in ("placeholder", "output") or not ctx.in_scope(node):
                continue
            reason = _must_stay(node, gm)
            if reason is not None:
                kept[reason] += 1
                continue
            removed["get_attr" if node.op == "get_attr" else "dead_nodes"] += 1
            gm.graph.erase_node(node)
        _delete_unused_state(gm, ctx)
        after = _state_census(gm)
        # Only the kinds that happened, so the report row stays readable.
        stats: dict[str, Any] = {k: removed[k] for k in _REMOVALS if removed[k]}
        stats.update({k: before[k] - after[k] for k in before if before[k] != after[k]})
        stats["bytes_freed"] = bytes_before - state_bytes(gm)
        if kept:
            stats["kept"] = dict(kept)
        modified = any(removed.values()) or before != after
        return PassResult(gm, modified, stats)


# -- what an op does to memory (fxcompress.ops.effects) ----------------------------
def _mutated_inputs(node: fx.Node, gm: fx.GraphModule) -> list[fx.Node]:
    """The input nodes this node writes into."""
    return [node.args[i] for i in describe(node, gm).effects.mutates]


def _may_alias_inputs(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether the node's result may share memory with one of its inputs."""
    return describe(node, gm).effects.may_alias


class _AliasSets:
    """Union-find over nodes that may share memory, with which sets are written in place
    and which reach the output.  Conservative: 'may alias' joins sets."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self._parent: dict[fx.Node, fx.Node] = {}
        self._mutated: set[fx.Node] = set()
        self._output: set[fx.Node] = set()
        for node in gm.graph.nodes:
            if _may_alias_inputs(node, gm):
                for arg in node.all_input_nodes:
                    self.union(node, arg)
        for node in gm.graph.nodes:
            self._mutated.update(self.find(m) for m in _mutated_inputs(node, gm))
            if node.op == "output":
                self._output.update(self.find(a) for a in node.all_input_nodes)

    def find(self, node: fx.Node) -> fx.Node:
        root = node
        while self._parent.get(root, root) is not root:
            root = self._parent[root]
        while node is not root:  # path compression keeps later finds O(1)
            self._parent[node], node = root, self._parent[node]
        return root

    def union(self, a: fx.Node, b: fx.Node) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra is rb:
            return
        self._parent[rb] = ra
        if rb in self._mutated:
            self._mutated.add(ra)
        if rb in self._output:
            self._output.add(ra)

    def copy_is_removable(self, copy: fx.Node, source: fx.Node) -> bool:
        """A copy may become its source when neither is written and the copy is not returned."""
        rc, rs = self.find(copy), self.find(source)
        return rc not in self._mutated and rs not in self._mutated and rc not in self._output


# -- no-ops ------------------------------------------------------------------------
def _strictly_row_major(node: Any) -> bool:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    if not hasattr(meta, "stride") or not meta.shape:
        return False
    shape, expected, step = tuple(meta.shape), [], 1
    for size in reversed(shape):
        expected.append(step)
        step *= size
    return all(s > 1 for s in shape) and tuple(meta.stride) == tuple(reversed(expected))


def _same_tensor_type(a: fx.Node, b: Any) -> bool:
    ma, mb = a.meta.get("tensor_meta"), b.meta.get("tensor_meta") if isinstance(b, fx.Node) else None
    return (hasattr(ma, "shape") and hasattr(mb, "shape")
            and tuple(ma.shape) == tuple(mb.shape) and ma.dtype == mb.dtype)


_NEUTRAL = {"add": (0, True), "sub": (0, False), "mul": (1, True), "div": (1, False)}  # (element, commutes)


def _no_op(node: fx.Node, gm: fx.GraphModule, aliases: _AliasSets) -> tuple[str, fx.Node] | None:
    """``(kind, source)`` when ``node`` computes nothing but ``source`` (at inference), else None."""
    if node.op not in ("call_module", "call_function", "call_method"):
        return None
    info = describe(node, gm)
    if info.kind is Kind.ELEMENTWISE:
        return _neutral_arithmetic(info, aliases)
    source = node.args[0] if node.args else None
    if not isinstance(source, fx.Node):
        return None
    # Dropout that is not training returns its input untouched, even with inplace=True.
    if info.kind is Kind.IDENTITY and info.module is not None:
        if len(node.args) != 1 or node.kwargs:
            return None
        if info.op == "identity":
            return "identity", source
        return ("dropout", source) if not info.module.training else None
    if (info.kind is Kind.IDENTITY and info.op == "dropout") or info.op == "stochastic_depth":
        return ("dropout", source) if info.params.get("training") is False else None
    if info.effects.mutates:
        return None
    if info.op == "contiguous" and node.op == "call_method":
        plain = len(node.args) == 1 and node.kwargs in ({}, {"memory_format": torch.contiguous_format})
        return ("contiguous", source) if plain and _strictly_row_major(source) else None
    if info.op == "clone" and len(node.args) == 1 and not node.kwargs:
        return ("clone", source) if aliases.copy_is_removable(node, source) else None
    return None


def _neutral_arithmetic(info: OpInfo, aliases: _AliasSets) -> tuple[str, fx.Node] | None:
    """``x*1``, ``1*x``, ``x+0``, ``0+x``, ``x-0``, ``x/1`` with a Python scalar, nothing else."""
    node = info.node
    if info.op not in _NEUTRAL or len(node.args) != 2 or node.kwargs or info.effects.mutates:
        return None
    neutral, commutes = _NEUTRAL[info.op]
    a, b = node.args
    if isinstance(a, fx.Node) and _is_scalar(b, neutral):
        source = a
    elif commutes and isinstance(b, fx.Node) and _is_scalar(a, neutral):
        source = b
    else:
        return None
    # A scalar cannot broadcast, but it can promote (int / 1 is float): compare the types.
    if _same_tensor_type(node, source) and aliases.copy_is_removable(node, source):
        return "arithmetic", source
    return None


def _is_scalar(value: Any, neutral: int) -> bool:
    return type(value) in (int, float) and value == neutral


# -- side effects ------------------------------------------------------------------
def _must_stay(node: fx.Node, gm: fx.GraphModule) -> str | None:
    """Why an unused node must not be erased, or None when it may go."""
    if node.op == "get_attr":
        return None
    effects = describe(node, gm).effects
    if effects.declared_impure:
        return "marked impure"
    if effects.random:
        return "random"
    if effects.mutates:
        written = [node.args[i] for i in effects.mutates]
        private = all(len(w.users) == 1 and w.op != "placeholder" and w.op != "get_attr"
                      and not _may_alias_inputs(w, gm) for w in written)
        return None if private else "in-place"
    if effects.side_effect:
        return "side effect"
    return None


# -- state -------------------------------------------------------------------------
def _state_census(gm: fx.GraphModule) -> dict[str, int]:
    """Distinct submodules, parameters and buffers reachable from ``gm``."""
    return {
        "submodules": len({id(m) for m in gm.modules()}),
        "parameters": len({id(p) for p in gm.parameters()}),
        "buffers": len({id(b) for b in gm.buffers()}),
    }


def _delete_unused_state(gm: fx.GraphModule, ctx: PassContext) -> None:
    """Delete every in-scope submodule and tensor attribute that no node reaches.

    A ``call_module`` node uses its module whole (children, parameters,
    buffers); a ``get_attr`` node uses one attribute (a whole module when it
    fetches one).  Decisions are per module *object*, so a module registered
    under two paths is judged by all its uses.
    """
    live: set[int] = set()  # modules whose entire state is in use
    fetched: dict[int, set[str]] = {}  # module -> attributes fetched by get_attr
    used_paths: set[str] = set()  # every used target and its ancestors
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "get_attr"):
            continue
        target = str(node.target)
        owner, _, attr = target.rpartition(".")
        value = getattr(gm.get_submodule(owner), attr)
        if isinstance(value, nn.Module):
            live.update(id(m) for m in value.modules())
        else:
            fetched.setdefault(id(gm.get_submodule(owner)), set()).add(attr)
        parts = target.split(".")
        used_paths.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    deleted: list[str] = []
    for path, module in list(gm.named_modules(remove_duplicate=False)):
        if not path or any(path.startswith(d + ".") for d in deleted[-1:]):
            continue
        if id(module) not in live and path not in used_paths and ctx.in_scope(path):
            gm.delete_submodule(path)
            deleted.append(path)
    for path, module in gm.named_modules(remove_duplicate=False):
        if id(module) in live or not ctx.in_scope(path):
            continue
        keep = fetched.get(id(module), set())
        names = [n for n, t in module._parameters.items() if t is not None]
        names += [n for n, t in module._buffers.items() if t is not None]
        names += [n for n, t in vars(module).items() if isinstance(t, torch.Tensor)]
        for name in names:
            if name not in keep:
                delattr(module, name)
