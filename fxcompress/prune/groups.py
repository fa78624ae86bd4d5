"""Channel dependency analysis: which channels must be removed together.

Vocabulary (see docs/pruning.md):

* a **channel space** is a tensor node's channel dims, as a :class:`Space`:
  the dims that hold channels and, for every position along them, the
  **atom** (an integer) that says which channel it is.  Ops that only move
  channels (activations, norms, pools, reshape/permute, concat, split, ...)
  give their output the same atoms, rearranged; ops that make channels
  (conv, linear, embedding outputs) allocate fresh atoms.
* the rules join atoms that must go together ("these are the same channel"):
  the two operands of a residual add or an SE multiply, the in- and
  out-channels of one group of a grouped conv, the channels of one GroupNorm
  group, the positions a channel shuffle must keep in step.  The connected
  components of these joins (a vectorised union-find: there is one atom per
  channel) are the **units**, the smallest sets of channels that can be removed.
* the channel spaces that make channels (sources) form a networkx graph,
  joined where they share a unit; its connected components are the
  **groups** (a conv's output channels with everything coupled to them, a
  residual stream); selection ratios apply per group.
* a unit is **frozen** when any of its atoms reaches something whose channel
  semantics we do not know (an unknown op, a matmul, an attention module), the
  model's outputs, or a layer outside the pass's scope; the reason is kept.

Guarantee: removing any set of non-frozen units, sliced by
:mod:`fxcompress.prune.slicing`, yields a model whose output shapes are
unchanged and whose every remaining channel computes what it computed before
(exactly, when the removed channels contributed nothing downstream), except
for units marked ``channel_norm`` (a LayerNorm over the channels, whose
statistics legitimately change when channels go).
"""

from __future__ import annotations

from typing import Callable

import networkx as nx
import torch
from torch import fx

from ..pass_base import module_path_of
from .rules import Analyzer
from .types import ChannelGraph, Group

__all__ = ["build_channel_graph"]


def build_channel_graph(gm: fx.GraphModule, in_scope: Callable[[fx.Node], bool] | None = None) -> ChannelGraph:
    """Analyse ``gm`` (which must carry ``tensor_meta``, as captured graphs do).

    ``in_scope(node) -> bool`` says which weighted nodes may be changed; the
    channels of the others (and every channel coupled to them) are frozen.
    """
    analyzer = Analyzer(gm, in_scope or (lambda node: True))
    analyzer.run()
    return _finalize(analyzer)


def _components(n: int, left: torch.Tensor, right: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Connected components of the atom graph, vectorised (it has one node per channel).

    Parallel union-find: hook each edge's larger root onto the smaller, then
    jump pointers until every atom points at its root; repeat until every edge
    joins atoms with the same root.  Pointers only ever decrease, so no cycles.
    """
    parent = torch.arange(n)
    while left.numel():
        low = torch.minimum(parent[left], parent[right])
        parent.scatter_reduce_(0, parent[left], low, "amin")
        parent.scatter_reduce_(0, parent[right], low, "amin")
        while True:
            jumped = parent[parent]
            if torch.equal(jumped, parent):
                break
            parent = jumped
        if torch.equal(parent[left], parent[right]):
            break
    roots, unit_of = torch.unique(parent, return_inverse=True)
    return int(roots.numel()), unit_of


def _finalize(a: Analyzer) -> ChannelGraph:
    """The units, frozen units and groups of a finished walk."""
    n_atoms = a.n_atoms
    left = torch.cat([e[0] for e in a.edges]) if a.edges else torch.zeros(0, dtype=torch.long)
    right = torch.cat([e[1] for e in a.edges]) if a.edges else torch.zeros(0, dtype=torch.long)
    n_units, unit_of = _components(n_atoms, left, right)
    frozen: dict[int, str] = {}
    all_reasons: dict[int, set[str]] = {}
    for atom, reason in a.frozen.items():
        unit = int(unit_of[atom])
        frozen.setdefault(unit, reason)
        all_reasons.setdefault(unit, set()).add(reason)
    head_units = torch.zeros(n_units, dtype=torch.bool)
    if a.head_atoms:
        head_units[unit_of[torch.cat(a.head_atoms)]] = True
    norm_units = torch.zeros(n_units, dtype=torch.bool)
    if a.norm_atoms:
        norm_units[unit_of[torch.cat(a.norm_atoms)]] = True
    # groups: the networkx graph of channel spaces that make channels (sources), joined when
    # they share a unit; its connected components are the groups
    names = list(a.sources)
    source_of_atom = torch.empty(n_atoms, dtype=torch.long)
    for i, name in enumerate(names):
        source_of_atom[a.sources[name]] = i
    spaces = nx.Graph()
    spaces.add_nodes_from(names)
    pairs = torch.unique(torch.stack([unit_of, source_of_atom], dim=1), dim=0)
    same_unit = pairs[1:, 0] == pairs[:-1, 0]
    for s1, s2 in zip(pairs[:-1, 1][same_unit].tolist(), pairs[1:, 1][same_unit].tolist()):
        spaces.add_edge(names[s1], names[s2])

    def rank(key: str) -> tuple[int, str]:  # graph order of the node that made the source
        return a.order[a.source_of[key][0]], key

    components = sorted((sorted(c, key=rank) for c in nx.connected_components(spaces)), key=lambda c: rank(c[0]))
    group_of_source = torch.empty(len(names), dtype=torch.long)
    index_of = {name: i for i, name in enumerate(names)}
    for gi, members in enumerate(components):
        group_of_source[[index_of[m] for m in members]] = gi
    group_of_unit = torch.empty(n_units, dtype=torch.long)
    group_of_unit[unit_of] = group_of_source[source_of_atom]
    nodes = {n.name: n for n in a.gm.graph.nodes}
    reasons: list[dict[str, int]] = [{} for _ in components]
    for u, unit_reasons in all_reasons.items():
        r = reasons[int(group_of_unit[u])]
        for reason in unit_reasons:
            r[reason] = r.get(reason, 0) + 1
    groups = []
    by_group = torch.argsort(group_of_unit, stable=True)
    counts = torch.bincount(group_of_unit, minlength=len(components)).tolist()
    start = 0
    for gi, members in enumerate(components):
        units = by_group[start:start + counts[gi]]
        start += counts[gi]
        modules = list(dict.fromkeys(p for p in (module_path_of(nodes[a.source_of[m][0]]) for m in members) if p))
        # heads: an attention module's head source, or units that are all heads of a decomposed attention
        heads = any(a.source_of[m][1] == "heads" for m in members) or bool(units.numel() and head_units[units].all())
        groups.append(Group(gi, members, modules, units, reasons[gi], bool(norm_units[units].any()), heads))
    return ChannelGraph(spaces, a.spaces, a.params, a.sources, unit_of, frozen, norm_units, groups,
                        group_of_unit, a.resized)
