"""``finetune``: train the graph on labelled data or distil it from a teacher (QAT, pruning recovery)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
from torch import fx

from fxcompress.distill import DISTILL_LOSSES, check_distill_options
from fxcompress.errors import ConfigError
from fxcompress.pass_base import Pass, PassContext, PassResult, check_choice
from fxcompress.quant.calibration import batch_inputs
from fxcompress.train import call_with, check_schedule, finetune, split_batch, training_loss

__all__ = ["Finetune"]

_OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class Finetune(Pass):
    """Trains the graph for ``steps`` optimizer steps on ``calibration_data`` (cycled as needed)
    and leaves it in eval mode: with ``loss_fn(outputs, target)`` on ``(inputs, target)``
    batches, or, with ``distill="kl"`` or ``"mse"``, against the outputs of the ``teacher``
    given to :func:`fxcompress.run` (KL on logits at ``temperature``, MSE on features;
    any output structure), which needs no labels.

    After ``to_fake_quant`` this is quantization-aware training: the weights learn
    to sit well on their quantization grid; after pruning or quantization, distillation
    from the uncompressed model recovers it on unlabelled data.  With both ``distill``
    and a ``loss_fn`` the loss is ``distill_weight * distillation + (1 - distill_weight)
    * task``.  Distilling without a ``loss_fn``, a batch is read as calibrate reads it
    (an ``(inputs, target)`` pair's target is dropped).  Under ``torchrun`` the graph
    trains data-parallel (DDP) on each rank's shard.  ``freeze_observers_after=N`` stops
    fake-quant modules from re-observing ranges after N steps (they start frozen after
    ``to_fake_quant``).  ``schedule`` (constant, cosine, linear) and ``warmup`` steps shape
    the learning rate (``fxcompress.train.lr_factor``); ``distill_layers`` (module paths, or
    ``{student_path: teacher_path}``) also matches those layers' outputs to the teacher's,
    weighted by ``layer_weight`` (``fxcompress.distill.LayerTaps``).  The data must be
    re-iterable (a list or a ``DataLoader``, not a generator) when ``calibrate`` reads it too.
    The manager refuses a run without the data, the loss function (unless distilling) or the
    teacher (when distilling) before any work; an unlabelled batch (with ``loss_fn``) or a
    non-finite loss raises :class:`~fxcompress.errors.InputError` naming the step.
    Stats: ``steps``, and ``loss_before`` / ``loss_after`` on the first batch.
    """

    name = "finetune"

    steps: int = 100
    lr: float = 1e-4
    optimizer: str = "adam"
    weight_decay: float = 0.0
    freeze_observers_after: int | None = None
    distill: str | None = None
    temperature: float = 1.0
    distill_weight: float = 1.0
    schedule: str = "constant"
    warmup: int = 0
    distill_layers: Any = None
    layer_weight: float = 1.0

    @property
    def needs(self) -> tuple[str, ...]:
        """What the run must give, checked by the manager before any work: training data; the
        loss function unless distilling; the teacher when distilling (and a loss function
        when ``distill_weight`` mixes in a task loss)."""
        if self.distill is None:
            return ("calibration_data", "loss_fn")
        return ("calibration_data", "teacher") + (("loss_fn",) if self.distill_weight != 1.0 else ())

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or self.steps < 1:
            raise ConfigError(f"steps must be a positive int, got {self.steps!r}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr!r}")
        check_choice("optimizer", self.optimizer, _OPTIMIZERS)
        check_schedule(self.schedule, self.warmup, self.steps)
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.freeze_observers_after is not None and self.freeze_observers_after < 0:
            raise ConfigError(f"freeze_observers_after must be >= 0 or None, "
                              f"got {self.freeze_observers_after!r}")
        if self.distill is not None and self.distill not in DISTILL_LOSSES:
            raise ConfigError(f"distill must be one of {DISTILL_LOSSES} or None, got {self.distill!r}")
        check_distill_options(self.distill or "kl", self.temperature, self.distill_weight, has_task=True)
        if self.distill_layers is not None and self.distill is None:
            raise ConfigError("distill_layers matches layers to the teacher's: set distill='kl' or 'mse' too")

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        teacher = self._teacher(ctx)
        data: Iterable = ctx.calibration_data  # type: ignore[assignment]
        labelled = ctx.loss_fn is not None
        if not labelled:
            data = _Inputs(data, ctx)
        if self.distill is not None and ctx.loss_fn is None and self.distill_weight != 1.0:
            raise ConfigError(f"distill_weight={self.distill_weight} mixes in a task loss, "
                              f"but fxcompress.run got no loss_fn")
        first = next(iter(data), None)
        before_state = [p.detach().clone() for p in gm.parameters()]
        loss_before = self._loss(gm, first, ctx, teacher, labelled)
        finetune(gm, data, ctx.loss_fn, steps=self.steps, lr=self.lr, optimizer=self.optimizer,
                 weight_decay=self.weight_decay, freeze_observers_after=self.freeze_observers_after,
                 progress=ctx.progress, seed=ctx.seed, teacher=teacher, distill=self.distill or "kl",
                 temperature=self.temperature, distill_weight=self.distill_weight if teacher is not None else 1.0,
                 labelled=labelled, schedule=self.schedule, warmup=self.warmup,
                 distill_layers=self.distill_layers, layer_weight=self.layer_weight)
        changed = any(not torch.equal(a, p.detach()) for a, p in zip(before_state, gm.parameters()))
        stats = {"steps": self.steps, "loss_before": loss_before,
                 "loss_after": self._loss(gm, first, ctx, teacher, labelled)}
        if teacher is not None:
            stats["distill"] = self.distill
        return PassResult(gm, changed, stats)

    def _teacher(self, ctx: PassContext) -> torch.nn.Module | None:
        """The teacher when distilling; ConfigError for what is missing."""
        if ctx.calibration_data is None:
            raise ConfigError("needs training data: give calibration_data as a list or "
                              "DataLoader of batches to fxcompress.run")
        if self.distill is None:
            if ctx.loss_fn is None:
                raise ConfigError("needs loss_fn(outputs, target) -> scalar tensor, "
                                  "given to fxcompress.run, or distill='kl'/'mse' with a teacher")
            return None
        if ctx.teacher is None:
            raise ConfigError(f"distill={self.distill!r} needs teacher=<model> given to "
                              f"fxcompress.run (typically the uncompressed model)")
        return ctx.teacher

    def _loss(self, gm: fx.GraphModule, batch: Any, ctx: PassContext, teacher: torch.nn.Module | None,
              labelled: bool) -> float | None:
        """The training loss on one batch in eval mode (None without data; finetune reports that)."""
        if batch is None:
            return None
        inputs, target = split_batch(batch) if labelled else (batch, None)
        with torch.no_grad():
            loss = training_loss(call_with(gm, inputs), inputs, target, ctx.loss_fn, teacher, self.distill or "kl",
                              self.temperature, self.distill_weight if teacher is not None else 1.0)
        return round(float(loss), 6)


class _Inputs:
    """Re-iterable view of calibration-style batches as model inputs (a labelled pair's target dropped)."""

    def __init__(self, data: Iterable, ctx: PassContext) -> None:
        self.data, self.args, self.kwargs = data, ctx.example_args, ctx.example_kwargs

    def __iter__(self) -> Iterator[Any]:
        for index, item in enumerate(self.data):
            args, kwargs = batch_inputs(item, index, self.args, self.kwargs)
            yield kwargs if not args else args
