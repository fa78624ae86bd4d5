"""``calibrate``: run calibration data through the observed graph and fix the activation qparams."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import fx

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
    """

    name = "calibrate"
    requires = ("insert_observers",)
    exact = True
    eval_only = True
    changes_outputs = False
    # The qparams are computed for, and folded into, float32 layers: a half-precision
    # model is refused before any work instead of failing at fold_fake_quant.
    float32_only = True

    num_batches: int | None = None

    def __post_init__(self) -> None:
        if self.num_batches is not None and (isinstance(self.num_batches, bool) or self.num_batches < 1):
            raise ConfigError(f"pass {self.name!r}: num_batches must be a positive int or None, "
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
        if batches == 0:
            raise CalibrationError("the calibration data is empty: give at least one batch")
        for observer in observers:
            observer.finalize()
        return PassResult(gm, True, {"batches": batches, "samples": samples, "observers": len(observers)})

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
