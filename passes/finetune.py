"""``finetune``: train the graph on labelled data (quantization-aware training, pruning recovery)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import fx

from fxcompress.errors import ConfigError
from fxcompress.pass_base import Pass, PassContext, PassResult
from fxcompress.train import call_with, finetune, split_batch

__all__ = ["Finetune"]

_OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class Finetune(Pass):
    """Trains the graph for ``steps`` optimizer steps on ``calibration_data`` read as
    ``(inputs, target)`` batches with ``loss_fn(outputs, target)`` (both given to
    :func:`fxcompress.run`), cycling the data as needed, and leaves it in eval mode.

    After ``to_fake_quant`` this is quantization-aware training: the weights learn
    to sit well on their quantization grid.  ``freeze_observers_after=N`` stops
    fake-quant modules from re-observing ranges after N steps (they start frozen
    after ``to_fake_quant``).  The data must be re-iterable (a list or a
    ``DataLoader``, not a generator) when ``calibrate`` reads it too.  The manager
    refuses a run without the data or the loss function before any work; an
    unlabelled batch or a non-finite loss raises :class:`~fxcompress.errors.InputError`
    naming the step.  Stats: ``steps``, and ``loss_before`` / ``loss_after`` on the first batch.
    """

    name = "finetune"
    needs = ("calibration_data", "loss_fn")

    steps: int = 100
    lr: float = 1e-4
    optimizer: str = "adam"
    weight_decay: float = 0.0
    freeze_observers_after: int | None = None

    def __post_init__(self) -> None:
        where = f"pass {self.name!r}"
        if isinstance(self.steps, bool) or self.steps < 1:
            raise ConfigError(f"{where}: steps must be a positive int, got {self.steps!r}")
        if not self.lr > 0:
            raise ConfigError(f"{where}: lr must be positive, got {self.lr!r}")
        if self.optimizer not in _OPTIMIZERS:
            raise ConfigError(f"{where}: optimizer must be one of {_OPTIMIZERS}, got {self.optimizer!r}")
        if self.weight_decay < 0:
            raise ConfigError(f"{where}: weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.freeze_observers_after is not None and self.freeze_observers_after < 0:
            raise ConfigError(f"{where}: freeze_observers_after must be >= 0 or None, "
                              f"got {self.freeze_observers_after!r}")

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if ctx.calibration_data is None:
            raise ConfigError(f"pass {self.name!r} needs training data: give calibration_data as a list or "
                              f"DataLoader of (inputs, target) batches to fxcompress.run")
        if ctx.loss_fn is None:
            raise ConfigError(f"pass {self.name!r} needs loss_fn(outputs, target) -> scalar tensor, "
                              f"given to fxcompress.run")
        first = next(iter(ctx.calibration_data), None)
        before_state = [p.detach().clone() for p in gm.parameters()]
        loss_before = _loss(gm, first, ctx.loss_fn)
        finetune(gm, ctx.calibration_data, ctx.loss_fn, steps=self.steps, lr=self.lr, optimizer=self.optimizer,
                 weight_decay=self.weight_decay, freeze_observers_after=self.freeze_observers_after,
                 progress=ctx.progress, seed=ctx.seed)
        changed = any(not torch.equal(a, p.detach()) for a, p in zip(before_state, gm.parameters()))
        stats = {"steps": self.steps, "loss_before": loss_before, "loss_after": _loss(gm, first, ctx.loss_fn)}
        return PassResult(gm, changed, stats)


def _loss(gm: fx.GraphModule, batch: Any, loss_fn: Callable[..., torch.Tensor]) -> float | None:
    """The loss on one labelled batch in eval mode (None without data; finetune reports that)."""
    if batch is None:
        return None
    inputs, target = split_batch(batch)
    with torch.no_grad():
        return round(float(loss_fn(call_with(gm, inputs), target)), 6)
