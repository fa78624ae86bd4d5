"""``prune_to_budget``: greedy (NetAdapt-style) per-group channel pruning to a MACs, parameter or latency budget."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import fx

from fxcompress.budget.latency import RESOURCES, LatencyTable, resource
from fxcompress.capture import propagate_shapes
from fxcompress.distill import DISTILL_LOSSES
from fxcompress.errors import ConfigError
from fxcompress.pass_base import Pass, PassContext, PassResult, check_choice
from fxcompress.prune import build_channel_graph, unit_scores
from fxcompress.prune.importance import DATA_FREE_CRITERIA
from fxcompress.budget import OutputSQNR, evaluate_metric
from fxcompress.budget.candidates import prune_removal, pruned_copy
from fxcompress.budget.measure import input_batches
from fxcompress.train import finetune
from fxcompress.api import _private_copy
from fxcompress.verify import stage_of

__all__ = ["PruneToBudget"]

_STRATEGIES = ("greedy",)


@dataclass(frozen=True)
class PruneToBudget(Pass):
    """Prunes channel groups, each to its own ratio, until the model costs at most ``keep``
    of its ``target`` resource ("macs", "params", or "latency" measured on this CPU per
    layer shape, a cached table), choosing step by step the change that loses the least
    metric per unit of resource saved.

    Each step (NetAdapt's loop, ``strategy="greedy"``) proposes, for every prunable group,
    removing ``step`` more of its original units (least ``importance`` first, scored on the
    current weights), builds each proposal physically, measures its resource and its metric
    (``eval_fn`` when given to :func:`fxcompress.run`, else the output SQNR against the
    unpruned model on the first ``num_batches`` batches of ``calibration_data``), and keeps
    the proposal with the smallest metric loss per unit saved.  With ``finetune_steps`` the
    kept model is then fine-tuned by distillation from the unpruned model (``distill``:
    "kl" on logits or "mse" on features; unlabelled ``calibration_data`` is enough; lr
    ``finetune_lr``) before the next step.  No group loses more than ``max_ratio`` of its
    units.  When no proposal can save more before the budget is met, the closest model is
    returned with ``met=False`` and a note, never silently.  Output shapes never change.
    Stats: ``target``, ``before`` / ``after`` / ``ratio`` of the resource, ``met``,
    ``metric`` (start, end), ``group_ratios`` (group -> share of units removed), ``steps``
    (group, resource, metric of every kept proposal), ``evaluations``.
    """

    name = "prune_to_budget"
    eval_only = True

    target: str = "macs"
    keep: float = 0.5
    strategy: str = "greedy"
    step: float = 0.125
    importance: str = "l2"
    max_ratio: float = 0.9
    num_batches: int | None = None
    finetune_steps: int = 0
    finetune_lr: float = 1e-3
    distill: str = "kl"

    def __post_init__(self) -> None:
        check_choice("target", self.target, RESOURCES)
        check_choice("strategy", self.strategy, _STRATEGIES)
        for name, value, low, high in (("keep", self.keep, 0.0, 1.0), ("step", self.step, 0.0, 1.0),
                                       ("max_ratio", self.max_ratio, 0.0, 1.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value < high:
                raise ConfigError(f"{name} must be a number in ({low:g}, {high:g}), got {value!r}")
        if self.importance not in DATA_FREE_CRITERIA:
            raise ConfigError(f"importance must be one of {', '.join(DATA_FREE_CRITERIA)}, "
                              f"got {self.importance!r}")
        if isinstance(self.finetune_steps, bool) or not isinstance(self.finetune_steps, int) \
                or self.finetune_steps < 0:
            raise ConfigError(f"finetune_steps must be an int >= 0, got {self.finetune_steps!r}")
        if self.distill not in DISTILL_LOSSES:
            raise ConfigError(f"distill must be one of {DISTILL_LOSSES}, got {self.distill!r}")

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        stage = stage_of(gm)
        if stage != "float":
            raise ConfigError(f"the graph is already {stage}; prune first, then quantize")
        args, kwargs = ctx.example_inputs()
        batches = input_batches(ctx.calibration_data, args, kwargs, self.num_batches) \
            if ctx.eval_fn is None or self.finetune_steps else []
        metric = self._metric(gm, ctx, batches)
        table = LatencyTable() if self.target == "latency" else None
        before = resource(gm, self.target, table)
        goal = self.keep * before
        original = {g.index: len(g.units) for g in build_channel_graph(gm, ctx.in_scope).groups}
        teacher = _private_copy(gm) if self.finetune_steps else None
        current, current_metric = gm, metric(gm)
        start_metric, cost, steps, evaluations = current_metric, before, [], 0
        removed_so_far = {g: 0 for g in original}
        while cost > goal:
            cg = build_channel_graph(current, ctx.in_scope)
            if [len(g.units) + removed_so_far[g.index] for g in cg.groups] != [original[g.index] for g in cg.groups]:
                break  # the group structure changed (cannot happen for sliced graphs; checked all the same)
            scores = unit_scores(current, cg, self.importance)
            prunable = cg.prunable()
            best: tuple[float, int, Any, float, float, int] | None = None
            for g in cg.groups:
                n = original[g.index]
                more = max(1, round(self.step * n))
                limit = int(self.max_ratio * n) - removed_so_far[g.index]
                take = min(more, limit, int(prunable[g.units].sum()) - 1)
                if take < 1:
                    continue
                removed = prune_removal(cg, scores, {g.index: take / len(g.units)})
                if not removed.any():
                    continue
                proposal = pruned_copy(current, removed, args, kwargs)
                evaluations += 1
                saved = cost - resource(proposal, self.target, table)
                if saved <= 0:
                    continue
                value = metric(proposal)
                score = (current_metric - value) / saved
                if best is None or score < best[0]:
                    best = (score, g.index, proposal, value, cost - saved, int(removed.sum()))
            if best is None:
                break  # nothing left to remove: the budget cannot be met
            _, index, current, current_metric, cost, count = best
            removed_so_far[index] += count
            if self.finetune_steps:
                self._finetune(current, teacher, ctx, batches)
                current_metric = metric(current)
            steps.append({"group": cg.groups[index].name, "removed": count, self.target: cost,
                          "metric": round(current_metric, 6)})
        if table is not None:
            table.save()
        met = cost <= goal
        stats: dict[str, Any] = {
            "target": self.target, "keep": self.keep, "before": before, "after": cost,
            "ratio": round(cost / before, 4) if before else None, "met": met,
            "metric": {"start": start_metric, "end": current_metric,
                       "kind": "eval_fn" if ctx.eval_fn is not None else "output SQNR (dB)"},
            "group_ratios": {g.name: round(removed_so_far[g.index] / original[g.index], 4)
                             for g in build_channel_graph(current).groups if removed_so_far.get(g.index)},
            "steps": steps, "evaluations": evaluations,
        }
        notes = [f"{self.target} {cost / before:.3f}x of the original in {len(steps)} steps" if before else ""]
        if not met:
            notes.append(f"budget MISSED: keep={self.keep} of {self.target} asked, {cost / before:.3f}x reached; "
                         f"no group can lose more (max_ratio={self.max_ratio}, scope); returning the closest model")
        stats["notes"] = [n for n in notes if n]
        if current is not gm:
            propagate_shapes(current, args, kwargs)
        return PassResult(current, bool(steps), stats)

    def _metric(self, gm: fx.GraphModule, ctx: PassContext, batches: list) -> Callable[[fx.GraphModule], float]:
        """The step metric, higher is better: eval_fn, else the output SQNR against ``gm`` as it is now."""
        if ctx.eval_fn is not None:
            eval_fn = ctx.eval_fn
            return lambda model: evaluate_metric(eval_fn, model, "during prune_to_budget")
        sqnr = OutputSQNR(_private_copy(gm), batches)
        return lambda model: min(sqnr(model), 200.0)  # an unchanged model scores 200 dB, not inf

    def _finetune(self, model: fx.GraphModule, teacher: fx.GraphModule | None, ctx: PassContext,
                  batches: list) -> None:
        """Distil the pruned model from the unpruned one on the calibration inputs."""
        inputs = [kw if not a else a for a, kw in batches]
        with torch.enable_grad():
            finetune(model, inputs, None, steps=self.finetune_steps, lr=self.finetune_lr, teacher=teacher,
                     distill=self.distill, progress=False, seed=ctx.seed)
