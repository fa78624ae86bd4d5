"""``calibrate``: run calibration data through the observed graph and fix the activation qparams."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import fx

from fxcompress import distributed
from fxcompress.errors import CalibrationError, ConfigError
from fxcompress.pass_base import Pass, PassContext, PassResult
from fxcompress.quant.activations import ActivationObserver
from fxcompress.quant.calibration import batch_inputs, batch_size

__all__ = ["Calibrate"]


@dataclass(frozen=True)
class Calibrate(Pass):
    """Runs ``calibration_data`` (all of it, or the first ``num_batches`` batches) through
    the observed graph under ``torch.inference_mode``, then computes every activation
    observer's qparams once (a histogram's range search runs here, not per batch); the
    graph and its outputs are unchanged.

    Each item of ``calibration_data`` (any iterable: a list, a ``DataLoader``) is
    one batch: a tensor, a tuple of positional inputs or a dict of keyword inputs.
    A labelled ``(inputs, target)`` pair is recognised when the model takes one input
    and the item is a 2-tuple whose first element is a tensor shaped like the example
    input except in the batch dim; the target is then ignored.  The manager refuses a run
    without ``calibration_data`` (unless the pipeline's observers observe no activations)
    or with a half-precision model before any work. Raises
    :class:`~fxcompress.errors.CalibrationError` for empty data, a batch
    whose inputs differ from the example inputs in number, dtype, rank or non-batch
    sizes (naming the batch, expected and given), NaN/Inf in a batch, NaN/Inf reaching
    an observer (naming its node) and an observer no batch reached.  On a graph without
    activation observers (``activations=None``) the pass does nothing.
    Stats: ``batches``, ``samples``, ``observers``.

    Across processes (an initialised ``torch.distributed`` group of more than one
    rank, e.g. under ``torchrun``; ``across_ranks=False`` turns it off) each rank
    passes its own shard of the data, and the observers are merged across ranks before
    the qparams are computed (:func:`fxcompress.distributed.merge_observers`): every
    rank ends with the qparams one process computes on the union of the shards, bit for
    bit for min/max observers, within the merge guarantee for histogram observers.
    Shards may differ in length, one may even be empty; ``batches`` and ``samples``
    then count the union, ``samples_per_rank`` lists each rank's, and a note says the
    shards are uneven.  A rank whose data raises makes every rank raise
    :class:`~fxcompress.errors.DistributedError` naming it.
    """

    name = "calibrate"
    requires = ("insert_observers",)
    exact = True
    eval_only = True
    # The qparams are computed for, and folded into, float32 layers: a half-precision
    # model is refused before any work instead of failing at fold_fake_quant.
    float32_only = True

    num_batches: int | None = None
    across_ranks: bool = True

    def __post_init__(self) -> None:
        if self.num_batches is not None and (isinstance(self.num_batches, bool) or self.num_batches < 1):
            raise ConfigError(f"num_batches must be a positive int or None, "
                              f"got {self.num_batches!r}")

    def needs_after(self, earlier: Sequence[Pass]) -> tuple[str, ...]:
        """Data, unless the observers this pipeline inserts observe no activations (weight-only)."""
        inserted = [p for p in earlier if p.name == "insert_observers"]
        if inserted and inserted[-1].options().get("activations", "default") is None:
            return ()
        return ("calibration_data",)

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        observers = [m for m in gm.modules() if isinstance(m, ActivationObserver)]
        if not observers:
            return PassResult(gm, False, {"batches": 0, "samples": 0, "observers": 0})
        w = distributed.world() if self.across_ranks else distributed.World()
        with distributed.collective_step("calibrate", w):
            batches, samples = self._observe(gm, ctx)
        stats = {"batches": batches, "samples": samples, "observers": len(observers)}
        notes = []
        if w.active:
            counts = distributed.all_gather_objects((batches, samples), w)
            stats["batches"] = sum(b for b, _ in counts)
            stats["samples"] = sum(n for _, n in counts)
            stats["ranks"] = w.size
            stats["samples_per_rank"] = [n for _, n in counts]
            if len({n for _, n in counts}) > 1:
                notes.append(f"uneven shards: ranks calibrated on {stats['samples_per_rank']} samples; the merged "
                             f"observers cover all {stats['samples']}")
            distributed.merge_observers([o.observer for o in observers], w)
        if stats["batches"] == 0:
            raise CalibrationError("the calibration data is empty: give at least one batch"
                                   + (" (on some rank)" if w.active else ""))
        for observer in observers:
            observer.finalize()
        if notes:
            stats["notes"] = notes
        return PassResult(gm, True, stats)

    def _observe(self, gm: fx.GraphModule, ctx: PassContext) -> tuple[int, int]:
        """Run this process's batches through the graph; ``(batches, samples)``."""
        if ctx.calibration_data is None:
            raise CalibrationError("no calibration data: pass calibration_data=[batch, ...] to fxcompress.run "
                                   "(a list or DataLoader of representative input batches)")
        batches = samples = 0
        for index, item in enumerate(self._batches(ctx)):
            args, kwargs = batch_inputs(item, index, *ctx.example_inputs())
            try:
                with torch.inference_mode():
                    gm(*args, **kwargs)
            except CalibrationError as exc:
                raise CalibrationError(f"calibration batch {index}: {exc}") from exc
            batches += 1
            samples += batch_size(args, kwargs)
        return batches, samples

    def _batches(self, ctx: PassContext) -> Any:
        data: Any = ctx.calibration_data
        total = self.num_batches
        if total is None and hasattr(data, "__len__"):
            total = len(data)
        elif total is not None and hasattr(data, "__len__"):
            total = min(total, len(data))
        if self.num_batches is not None:
            data = (item for i, item in zip(range(self.num_batches), data))
        if ctx.progress:
            from tqdm.auto import tqdm

            data = tqdm(data, total=total, desc="calibrate", unit="batch", leave=False)
        return data
