"""The ``prune_channels`` pass: structured channel pruning, physically."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
from torch import fx

from fxcompress.capture import propagate_shapes
from fxcompress.errors import ConfigError, InputError, PassError
from fxcompress.pass_base import Pass, PassContext, PassResult
from fxcompress.prune import (CRITERIA, ChannelGraph, activation_terms, apply_removal, build_channel_graph, select,
                              taylor_terms, unit_scores, unused_patterns)
from fxcompress.prune.selection import group_ratio

__all__ = ["PruneChannels"]


def _check_ratio(name: str, value: Any) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1):
        raise ConfigError(f"{name} must be a number in [0, 1), got {value!r}")


@dataclass(frozen=True)
class PruneChannels(Pass):
    """Removes ``ratio`` of the channels of every dependency group, physically.

    Channels that must go together (a conv's outputs, the BatchNorm after it,
    every consumer's inputs, everything joined by residual adds, SE multiplies,
    concatenation offsets, grouped convs, flatten heads, channel shuffles) form
    units; units are scored by ``importance`` over all their members and the
    least important are removed by slicing weights, biases and norm parameters
    and replacing modules with smaller ones; literal shape arguments are
    updated and shapes re-propagated.  Output shapes never change; channels
    whose semantics are unknown, or that touch layers outside ``scope``/``skip``,
    are frozen (``stats["frozen"]`` says why).

    Attention layers (``nn.MultiheadAttention``) lose whole heads, at
    ``head_ratio`` (default ``ratio``), and their input and output widths
    prune with the residual stream; such a layer becomes a
    ``PrunedMultiheadAttention`` (``fxcompress.prune.attention``).

    Options: ``ratio`` in [0, 1); ``importance`` one of l1, l2, taylor (needs
    ``loss_fn`` and ``calibration_data``), activation (needs ``calibration_data``:
    consumer columns scored by weight norm times activation norm), bn_scale, random, or a function
    ``fn(tensor, dim) -> scores``; ``round_to`` keeps unit counts multiples of
    N; ``global_ranking`` ranks all groups together (no group losing more than
    ``max_ratio``); ``min_channels`` per sliced space; ``layer_ratios`` maps
    module-name patterns to ratios; ``head_ratio`` in [0, 1) or None;
    ``seed`` drives ``random``.
    """

    name = "prune_channels"
    exact = False
    stages = ("float",)
    # Pruning slices float weights: once anything quantized or lowered them it has nothing to cut.
    runs_before = ("insert_observers", "to_fake_quant", "fold_fake_quant", "lower", "quantize_dynamic",
                   "quantize_weights")

    ratio: float = 0.5
    importance: Union[str, Callable] = "l2"
    round_to: int = 1
    global_ranking: bool = False
    max_ratio: float = 0.9
    min_channels: int = 1
    layer_ratios: dict = field(default_factory=dict)
    head_ratio: Optional[float] = None
    seed: int = 0

    def __post_init__(self) -> None:
        _check_ratio("ratio", self.ratio)
        if self.head_ratio is not None:
            _check_ratio("head_ratio", self.head_ratio)
        if not (isinstance(self.max_ratio, (int, float)) and 0 < self.max_ratio < 1):
            raise ConfigError(f"max_ratio must be a number in (0, 1), got {self.max_ratio!r}")
        for key, name in (("round_to", self.round_to), ("min_channels", self.min_channels)):
            if not isinstance(name, int) or isinstance(name, bool) or name < 1:
                raise ConfigError(f"{key} must be an int >= 1, got {name!r}")
        if not (callable(self.importance) or self.importance in CRITERIA):
            raise ConfigError(f"importance must be one of {CRITERIA} or a function "
                              f"fn(tensor, dim) -> scores, got {self.importance!r}")
        if not isinstance(self.layer_ratios, dict):
            raise ConfigError(f"layer_ratios must map module patterns to ratios, "
                              f"got {type(self.layer_ratios).__name__}")
        for pattern, r in self.layer_ratios.items():
            if not isinstance(pattern, str):
                raise ConfigError(f"layer_ratios keys are module-name patterns, got {pattern!r}")
            _check_ratio(f"layer_ratios[{pattern!r}]", r)

    @property
    def needs(self) -> tuple[str, ...]:  # type: ignore[override]
        """Taylor importance measures gradients: it needs data and a loss; activation importance, data."""
        if self.importance == "taylor":
            return ("calibration_data", "loss_fn")
        return ("calibration_data",) if self.importance == "activation" else ()

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        self.check_stage(gm, "prune first, then quantize (see recipes.prune_then_int8)")
        # gradients are measured on the graph as it is, before anything is analysed or sliced
        taylor = taylor_terms(gm, ctx.calibration_data, ctx.loss_fn) if self.importance == "taylor" else None
        # which channels (and attention heads) must go together, and which must stay
        cg = build_channel_graph(gm, ctx.in_scope)
        unused = unused_patterns(cg, self.layer_ratios)
        if unused:
            raise ConfigError(f"layer_ratios patterns {unused} match no prunable layer "
                              f"(layers: {', '.join(m for g in cg.groups for m in g.modules[:1])})")
        frozen = _frozen_summary(cg)
        stats: dict[str, Any] = {"groups": len(cg.groups), "units": cg.n_units, "frozen": frozen}
        if not cg.prunable().any():
            stats["notes"] = ["every channel group is frozen; the model is returned unchanged: "
                              + "; ".join(f"{r} ({n} units)" for r, n in list(frozen.items())[:5])]
            return PassResult(gm, False, stats)
        # the least important units of every group go
        activation = activation_terms(gm, cg, ctx.calibration_data, ctx.example_args, ctx.example_kwargs) \
            if self.importance == "activation" else None
        scores = unit_scores(gm, cg, self.importance, taylor=taylor, activation=activation, seed=self.seed)
        removed = select(cg, scores, ratio=self.ratio, layer_ratios=self.layer_ratios, head_ratio=self.head_ratio,
                         global_ranking=self.global_ranking, max_ratio=self.max_ratio,
                         round_to=self.round_to, min_channels=self.min_channels)
        stats.update(self._removed_summary(cg, removed))
        if not removed.any():
            return PassResult(gm, False, stats)
        # slice physically, then prove the graph still holds by propagating shapes through it
        stats.update(apply_removal(gm, cg, removed))
        gm.recompile()
        try:
            propagate_shapes(gm, ctx.example_args, ctx.example_kwargs)  # tensor_meta is true again
        except InputError as exc:  # the inputs ran before the slicing: the pass is at fault, not they
            raise PassError(f"the sliced graph no longer runs (a bug of the pruning "
                            f"analysis; please report it, and skip the layers involved meanwhile): {exc}") from exc
        return PassResult(gm, True, stats)

    def _removed_summary(self, cg: ChannelGraph, removed: torch.Tensor) -> dict[str, Any]:
        """Units, channels and heads removed, and kept/total units of every group that was asked to shrink."""
        is_head = torch.zeros(cg.n_units, dtype=torch.bool)
        for g in cg.groups:
            is_head[g.units] = g.heads
        return {
            "removed_units": int(removed.sum()),
            "removed_channels": int((removed & ~is_head)[cg.unit_of].sum()),
            "removed_heads": int((removed & is_head).sum()),
            "per_group": {g.name: f"{int((~removed[g.units]).sum())}/{len(g.units)}" for g in cg.groups
                          if removed[g.units].any()
                          or group_ratio(g, self.ratio, self.layer_ratios, self.head_ratio) > 0},
        }


def _frozen_summary(cg: ChannelGraph) -> dict[str, int]:
    """Frozen units per reason, most frequent first."""
    counts: dict[str, int] = {}
    for g in cg.groups:
        for reason, n in g.frozen.items():
            counts[reason] = counts.get(reason, 0) + n
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))
