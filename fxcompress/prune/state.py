"""The channel analysis' state and the bookkeeping every rule uses.

:class:`AnalysisState` holds what the walk has found so far (the atoms, the
"same channel" edges between them, the frozen atoms with their reasons, the
parameter slices) and the operations the rules build it with: allocate atoms,
join them, freeze them, record which parameter dim they index.  It implements
:class:`~fxcompress.prune.types.RuleState`, the protocol the rule mixins are
written against; :class:`~fxcompress.prune.rules.Analyzer` combines it with them.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import fx

from ..ops import OpInfo, meta_shape
from ..pass_base import module_path_of
from .types import EMPTY, ParamSlice, Space

__all__ = ["AnalysisState", "owner_attr"]


def owner_attr(target: str) -> tuple[str, str]:
    """(owner module path, attribute name) of a dotted ``get_attr`` target."""
    owner, _, attr = target.rpartition(".")
    return owner, attr


class AnalysisState:
    """Builds atoms, unions ("same channel" edges), frozen atoms and parameter slices."""

    def __init__(self, gm: fx.GraphModule, in_scope: Callable[[fx.Node], bool]) -> None:
        self.gm = gm
        self.in_scope = in_scope
        self.n_atoms = 0
        self.edges: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.frozen: dict[int, str] = {}
        self.norm_atoms: list[torch.Tensor] = []
        self.head_atoms: list[torch.Tensor] = []  # atoms of attention heads made by plain projections
        self.spaces: dict[fx.Node, Any] = {}
        self.values: dict[fx.Node, Any] = {}
        self.params: dict[tuple[str, str, int], ParamSlice] = {}
        self.sources: dict[str, torch.Tensor] = {}
        self.source_of: dict[str, tuple[str, str]] = {}  # source key -> (node name, part)
        self.resized: list[fx.Node] = []
        self.order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
        # parameter dims that some call meets with fixed channels -> why (see fixed_dim)
        self.fixed: dict[tuple[str, str, int], str] = {}

    # -- atoms ---------------------------------------------------------------
    def fresh(self, n: int, node: fx.Node, frozen: str | None = None, part: str = "") -> torch.Tensor:
        """``n`` new atoms made by ``node``; ``part`` names a second kind of channels it makes (heads)."""
        ids = torch.arange(self.n_atoms, self.n_atoms + n)
        self.n_atoms += n
        key = f"{node.name}:{part}" if part else node.name
        self.source_of[key] = (node.name, part)
        prev = self.sources.get(key)
        self.sources[key] = ids if prev is None else torch.cat([prev, ids])
        if frozen:
            self.freeze(ids, frozen)
        return ids

    def mark_heads(self, ids: torch.Tensor) -> None:
        """``ids`` are attention heads (one unit per head) although linears made them: a group
        whose every unit is such a head is chosen as heads (per layer, ``head_ratio``)."""
        self.head_atoms.append(ids.reshape(-1))

    def out_of_scope(self, node: fx.Node) -> str:
        """The freeze reason for a layer outside scope/skip, named by module path as scope patterns are."""
        return f"{module_path_of(node) or node.name}: outside the pass's scope"

    def union(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = a.reshape(-1), b.reshape(-1)
        if a.numel() and not torch.equal(a, b):
            self.edges.append((a, b))

    def freeze(self, ids: torch.Tensor | Space | None, reason: str) -> None:
        if isinstance(ids, Space):
            ids = None if ids.empty else ids.ids
        if ids is None:
            return
        for atom in ids.reshape(-1).unique().tolist():
            if atom >= 0:
                self.frozen.setdefault(atom, reason)

    def freeze_all(self, value: Any, reason: str) -> None:
        """Freeze every atom reachable in a (nested) argument structure of nodes."""
        def visit(n: fx.Node) -> fx.Node:
            self._freeze_space(self.spaces.get(n), reason)
            return n
        fx.node.map_arg(value, visit)

    def _freeze_space(self, space: Any, reason: str) -> None:
        if isinstance(space, Space):
            self.freeze(space, reason)
        elif isinstance(space, tuple):
            for s in space:
                self._freeze_space(s, reason)

    def record(self, owner: str, attr: str, dim: int, ids: torch.Tensor, role: str, node: fx.Node) -> None:
        """Parameter ``owner.attr`` is sliced along ``dim`` by ``ids``; one param, one index set."""
        key = (owner, attr, dim)
        if key in self.fixed:
            self.freeze(ids, self.fixed[key])
        prev = self.params.get(key)
        if prev is not None:  # a module (or constant) used twice: its channels are the same channels
            self.union(prev.ids, ids)
            return
        self.params[key] = ParamSlice(owner, attr, dim, ids.reshape(-1), role, node.name)

    def fixed_dim(self, owner: str, attr: str, dim: int, node: fx.Node) -> None:
        """Parameter ``owner.attr`` meets channels that never change along ``dim`` at ``node``
        (its input there carries none that can go, e.g. a graph input).

        A module called twice (the same object under two names, or reused) has one
        weight for both calls: if another call slices that dim, this call would break,
        so the channels recorded for it anywhere are frozen.
        """
        key = (owner, attr, dim)
        reason = (f"{owner or '(root)'}.{attr} is used by more than one call, and at node {node.name} its dim "
                  f"{dim} meets channels that are fixed")
        self.fixed.setdefault(key, reason)
        prev = self.params.get(key)
        if prev is not None:
            self.freeze(prev.ids, reason)

    def space(self, value: Any) -> Space:
        s = self.spaces.get(value) if isinstance(value, fx.Node) else None
        return s if isinstance(s, Space) else EMPTY

    def empty_like(self, meta: Any) -> Any:
        if meta_shape(meta) is not None:
            return EMPTY
        if isinstance(meta, (tuple, list)):
            return tuple(self.empty_like(m) for m in meta)
        return None

    # -- what every rule falls back on -----------------------------------------
    def unknown(self, info: OpInfo, reason: str) -> None:
        node = info.node
        self.freeze_all((node.args, node.kwargs), reason)
        self.spaces[node] = self.empty_like(node.meta.get("tensor_meta"))

    def pass_through(self, info: OpInfo) -> None:
        self.spaces[info.node] = self.space(info.inputs[0] if info.inputs else None)

    def check_dims(self, x: Space, allowed: set[int], info: OpInfo) -> str | None:
        if x.empty or set(x.dims) <= allowed:
            return None
        return f"{info.op} at node {info.node.name}: channels arrive on dims {x.dims}, expected {sorted(allowed)}"

    # -- parameters --------------------------------------------------------------
    def param_ref(self, info: OpInfo, name: str) -> tuple[str, str] | None:
        """(owner, attr) of a module's parameter/buffer or of a get_attr argument."""
        if info.module is not None:
            t = getattr(info.module, name, None)
            return (str(info.node.target), name) if isinstance(t, torch.Tensor) else None
        ref = info.params.get(name)
        if ref is None and name == "weight" and info.op == "prelu" and len(info.node.args) > 1:
            ref = info.node.args[1]
        if isinstance(ref, fx.Node) and ref.op == "get_attr":
            return owner_attr(str(ref.target))
        return None

    def param_tensor(self, ref: tuple[str, str]) -> torch.Tensor | None:
        """The tensor ``(owner, attr)`` names, or None if it is not a tensor."""
        owner = self.gm.get_submodule(ref[0])
        t = getattr(owner, ref[1], None)
        return t if isinstance(t, torch.Tensor) else None
