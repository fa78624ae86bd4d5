"""Selection: which units to remove, given their scores.

Ratios count units (channels, or whole conv groups for grouped convolutions).

* uniform: every group removes ``ratio`` of its units, least important first;
* per layer: ``layer_ratios`` maps module-name patterns to ratios; a group
  takes the ratio of the first pattern matching one of its source modules;
* global: units of all groups are ranked together on scores normalised by
  their group's mean, ``ratio`` of all units go, and no group loses more
  than ``max_ratio`` of its units;
* attention heads: each attention layer's heads are a group of their own,
  always chosen per layer at ``head_ratio`` (default ``ratio``);
* per group: ``group_ratios`` maps group indices to ratios and overrides all
  of the above for those groups (what greedy, budget-driven pruning and the
  sensitivity analysis choose).

Always: frozen units stay; a group keeps a multiple of ``round_to`` units
(rounded up, so never more is removed than asked); and every channel space
that a parameter is sliced by (a conv's outputs, a consumer's inputs, one
piece of a concatenation, ...) keeps at least ``min_channels`` positions, so
no layer is ever emptied.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

from ..pass_base import PassContext
from .types import ChannelGraph, Group

__all__ = ["group_ratio", "unused_patterns", "select"]


def group_ratio(group: Group, ratio: float, layer_ratios: Mapping[str, float] | None,
                head_ratio: float | None = None) -> float:
    """The ratio for ``group``: the first ``layer_ratios`` pattern matching a source module, else
    ``head_ratio`` for attention heads (when given), else ``ratio``."""
    for pattern, r in (layer_ratios or {}).items():
        matcher = PassContext(scope=(pattern,))
        if any(matcher.in_scope(m) for m in group.modules):
            return float(r)
    return head_ratio if group.heads and head_ratio is not None else ratio


def unused_patterns(cg: ChannelGraph, layer_ratios: Mapping[str, float] | None) -> list[str]:
    """Patterns of ``layer_ratios`` that match no source module of any group."""
    modules = [m for g in cg.groups for m in g.modules]
    return [p for p in (layer_ratios or {}) if not any(PassContext(scope=(p,)).in_scope(m) for m in modules)]


class _Floor:
    """Tracks how many positions every sliced channel space keeps."""

    def __init__(self, cg: ChannelGraph, min_channels: int) -> None:
        self.min = min_channels
        seen: set[tuple[int, int]] = set()
        self.kept: list[int] = []
        self.of_unit: dict[int, list[tuple[int, int]]] = {}
        spaces = [ps.ids for ps in cg.params.values()] + list(cg.sources.values())
        for ids in spaces:
            key = (ids.data_ptr(), ids.numel())
            if key in seen or not ids.numel():
                continue
            seen.add(key)
            units, counts = torch.unique(cg.unit_of[ids.reshape(-1)], return_counts=True)
            index = len(self.kept)
            self.kept.append(int(counts.sum()))
            for u, c in zip(units.tolist(), counts.tolist()):
                self.of_unit.setdefault(u, []).append((index, c))

    def try_remove(self, unit: int) -> bool:
        entries = self.of_unit.get(unit, ())
        if any(self.kept[s] - c < self.min for s, c in entries):
            return False
        for s, c in entries:
            self.kept[s] -= c
        return True

    def restore(self, unit: int) -> None:
        for s, c in self.of_unit.get(unit, ()):
            self.kept[s] += c


def _keep_target(n: int, ratio: float, round_to: int, min_channels: int) -> int:
    keep = max(min_channels, math.floor(n * (1.0 - ratio) + 1e-9))
    keep = math.ceil(keep / round_to) * round_to
    return min(n, keep)


def select(cg: ChannelGraph, scores: torch.Tensor, *, ratio: float,
           layer_ratios: Mapping[str, float] | None = None, head_ratio: float | None = None,
           global_ranking: bool = False, max_ratio: float = 0.9, round_to: int = 1,
           min_channels: int = 1, group_ratios: Mapping[int, float] | None = None) -> torch.Tensor:
    """Bool per unit: removed.  Deterministic for given scores (ties by unit index).

    Attention heads are always chosen per attention layer (``head_ratio``,
    default ``ratio``), also under ``global_ranking``, and ``round_to`` does
    not apply to them: a head group's width is a multiple of ``head_dim`` anyway.
    """
    removed = torch.zeros(cg.n_units, dtype=torch.bool)
    prunable = cg.prunable()
    floor = _Floor(cg, min_channels)
    fixed = dict(group_ratios or {})
    for g in cg.groups:
        if g.index in fixed or g.heads or not global_ranking:
            r = fixed[g.index] if g.index in fixed else group_ratio(g, ratio, layer_ratios, head_ratio)
            n = len(g.units)
            todo = n - _keep_target(n, r, 1 if g.heads else round_to, min_channels)
            if r <= 0 or todo <= 0:
                continue
            candidates = g.units[prunable[g.units]]
            order = candidates[torch.argsort(scores[candidates], stable=True)]
            for u in order.tolist():
                if todo == 0:
                    break
                if floor.try_remove(u):
                    removed[u] = True
                    todo -= 1
    if global_ranking:
        _select_global(cg, scores, [g for g in cg.groups if not g.heads and g.index not in fixed], removed, prunable, floor,
                       ratio=ratio, max_ratio=max_ratio, round_to=round_to, min_channels=min_channels)
    return removed


def _select_global(cg: ChannelGraph, scores: torch.Tensor, groups: list[Group], removed: torch.Tensor,
                   prunable: torch.Tensor, floor: _Floor, *, ratio: float, max_ratio: float, round_to: int,
                   min_channels: int) -> None:
    """Mark, in ``removed``, the least important units of ``groups`` ranked together."""
    normalised = scores.clone().double()
    caps: dict[int, int] = {}
    total = 0
    for g in groups:
        if not prunable[g.units].any():
            continue
        mean = float(scores[g.units].double().mean())
        if mean > 0:
            normalised[g.units] = scores[g.units].double() / mean
        n = len(g.units)
        total += n
        caps[g.index] = n - _keep_target(n, max_ratio, 1, min_channels)
    target = math.floor(total * ratio + 1e-9)
    candidates = torch.nonzero(prunable).reshape(-1)
    candidates = candidates[[int(cg.group_of_unit[u]) in caps for u in candidates.tolist()]] \
        if candidates.numel() else candidates
    order = candidates[torch.argsort(normalised[candidates], stable=True)].tolist()
    taken: dict[int, list[int]] = {}
    count = 0
    for u in order:
        if count >= target:
            break
        gi = int(cg.group_of_unit[u])
        if len(taken.get(gi, ())) >= caps[gi] or not floor.try_remove(u):
            continue
        taken.setdefault(gi, []).append(u)
        removed[u] = True
        count += 1
    for gi, units in taken.items():  # round the kept count up to a multiple of round_to
        n = len(cg.groups[gi].units)
        while (n - len(units)) % round_to and units:
            u = units.pop()  # the most important of the removed ones
            removed[u] = False
            floor.restore(u)
