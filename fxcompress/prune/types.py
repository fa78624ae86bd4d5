"""The data of the channel analysis: :class:`Space`, :class:`ParamSlice`, :class:`Group`,
:class:`ChannelGraph`, and :class:`RuleState`, the state the rules share.

The vocabulary (channel spaces, atoms, units, groups, frozen units) is explained in
:mod:`fxcompress.prune.groups`, which builds a :class:`ChannelGraph`; this module holds
only the types, so that every part of the analysis (the state, the rule mixins,
selection, slicing) imports them from here and the imports run one way:
``groups`` (the builder) ``-> rules`` (the analyzer and its dispatch table) ``->``
``state``, ``weighted_rules``, ``flow_rules``, ``labels``, ``heads`` ``-> types``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import networkx as nx
import torch
from torch import fx

from ..ops import OpInfo

__all__ = ["Space", "EMPTY", "ParamSlice", "Group", "ChannelGraph", "RuleState"]


@dataclass(frozen=True)
class Space:
    """The channel dims of one tensor and the atom at every position along them.

    ``dims`` are sorted, non-negative; ``ids`` has shape ``[shape[d] for d in
    dims]``.  ``dims == ()`` means the tensor carries no prunable channels
    (its shape can never change).
    """

    dims: tuple[int, ...]
    ids: torch.Tensor

    @property
    def empty(self) -> bool:
        return not self.dims


EMPTY = Space((), torch.tensor(-1))


@dataclass(frozen=True)
class ParamSlice:
    """Parameter ``owner.attr`` is indexed by atoms ``ids`` along ``dim``.

    ``role``: "out" (a producer's output channels), "in" (a consumer's input
    channels), "norm" (per-channel norm/activation parameters and buffers) or
    "const" (a constant combined elementwise with the channels).
    """

    owner: str
    attr: str
    dim: int
    ids: torch.Tensor
    role: str
    node: str


@dataclass
class Group:
    """Units made by the same sources, with what keeps some of them."""

    index: int
    sources: list[str]
    modules: list[str]
    units: torch.Tensor
    frozen: dict[str, int] = field(default_factory=dict)  # reason -> units it freezes (a unit may have several)
    channel_norm: bool = False
    heads: bool = False  # its units are attention heads, not channels

    @property
    def name(self) -> str:
        shown = self.modules[:2] + (["..."] if len(self.modules) > 2 else [])
        return (",".join(shown) or ",".join(self.sources[:2])) + (" (heads)" if self.heads else "")


@dataclass
class ChannelGraph:
    """The result of :func:`build_channel_graph`."""

    graph: nx.Graph  # channel spaces that make channels (sources); an edge = they share channels
    spaces: dict[fx.Node, Any]  # Space, a tuple of them (multi-output nodes), or None (non-tensors)
    params: dict[tuple[str, str, int], ParamSlice]
    sources: dict[str, torch.Tensor]  # node name (":heads" added for attention heads) -> atoms it allocated
    unit_of: torch.Tensor  # atom -> unit
    frozen_units: dict[int, str]  # unit -> the first reason met in graph order
    norm_units: torch.Tensor  # bool per unit: passes a norm over the channel dim
    groups: list[Group]
    group_of_unit: torch.Tensor
    resized: list[fx.Node]  # nodes with literal size arguments to update after slicing

    @property
    def n_units(self) -> int:
        return int(self.group_of_unit.numel())

    def prunable(self) -> torch.Tensor:
        """Bool per unit: not frozen."""
        mask = torch.ones(self.n_units, dtype=torch.bool)
        if self.frozen_units:
            mask[torch.tensor(list(self.frozen_units))] = False
        return mask


class RuleState(Protocol):
    """What the rule mixins (:class:`~fxcompress.prune.weighted_rules.WeightedRules`,
    :class:`~fxcompress.prune.flow_rules.FlowRules`, :class:`~fxcompress.prune.labels.LabelOps`,
    :class:`~fxcompress.prune.heads.AttentionRule`) read and call on the analyzer they are
    part of; :class:`~fxcompress.prune.state.AnalysisState` defines all of it."""

    gm: fx.GraphModule
    in_scope: Callable[[fx.Node], bool]
    spaces: dict[fx.Node, Any]  # Space, a tuple of them (multi-output nodes), or None
    values: dict[fx.Node, Any]  # the values of non-tensor nodes (sizes), None where unknown
    resized: list[fx.Node]

    def fresh(self, n: int, node: fx.Node, frozen: str | None = None, part: str = "") -> torch.Tensor: ...
    def union(self, a: torch.Tensor, b: torch.Tensor) -> None: ...
    def mark_heads(self, ids: torch.Tensor) -> None: ...
    def freeze(self, ids: torch.Tensor | Space | None, reason: str) -> None: ...
    def freeze_all(self, value: Any, reason: str) -> None: ...
    def record(self, owner: str, attr: str, dim: int, ids: torch.Tensor, role: str, node: fx.Node) -> None: ...
    def space(self, value: Any) -> Space: ...
    def unknown(self, info: OpInfo, reason: str) -> None: ...
    def pass_through(self, info: OpInfo) -> None: ...
    def out_of_scope(self, node: fx.Node) -> str: ...
    def check_dims(self, x: Space, allowed: set[int], info: OpInfo) -> str | None: ...
    def empty_like(self, meta: Any) -> Any: ...
    def param_ref(self, info: OpInfo, name: str) -> tuple[str, str] | None: ...
    def param_tensor(self, ref: tuple[str, str]) -> torch.Tensor | None: ...
