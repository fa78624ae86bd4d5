"""What the budget tools measure: the task metric (checked) and the output SQNR against float.

:func:`check_metric` turns what an ``eval_fn`` returned into a float or raises
:class:`~fxcompress.errors.MetricError`; :class:`OutputSQNR` holds the float
model's outputs on a fixed list of batches and scores any variant of the model
against them.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from ..distill import output_leaves
from ..boundary import check_metric
from ..errors import ConfigError
from ..quant.calibration import batch_inputs

__all__ = ["check_metric", "evaluate_metric", "OutputSQNR", "input_batches"]


def evaluate_metric(eval_fn: Callable[[nn.Module], Any], model: nn.Module, where: str) -> float:
    """``eval_fn(model)`` under ``torch.no_grad``, checked by :func:`check_metric`."""
    with torch.no_grad():
        return check_metric(eval_fn(model), where)


def input_batches(data: Iterable | None, example_args: tuple, example_kwargs: dict,
                  num_batches: int | None) -> list[tuple[tuple, dict]]:
    """The first ``num_batches`` items of ``data`` (all with None) as ``(args, kwargs)``,
    read as calibrate reads them (a labelled pair's target dropped)."""
    if data is None:
        raise ConfigError("no calibration data: give calibration_data=[batch, ...] (representative inputs)")
    batches = []
    for index, item in enumerate(data):
        if num_batches is not None and index >= num_batches:
            break
        batches.append(batch_inputs(item, index, example_args, example_kwargs))
    if not batches:
        raise ConfigError("the calibration data is empty: give at least one batch")
    return batches


def _float_leaves(value: Any) -> list[torch.Tensor]:
    return [v.detach().double() for _, v in output_leaves(value)
            if isinstance(v, torch.Tensor) and v.is_floating_point()]


class OutputSQNR:
    """The SQNR, in dB, of a model's outputs against reference outputs on fixed batches.

    ``10 log10(Σ ref² / Σ (ref − out)²)`` over every floating-point output leaf of
    every batch, in float64; ``inf`` when the outputs are identical.
    """

    def __init__(self, reference: nn.Module, batches: Sequence[tuple[tuple, dict]]) -> None:
        self.batches = list(batches)
        with torch.no_grad():
            self.reference = [_float_leaves(reference(*a, **k)) for a, k in self.batches]
        self.signal = sum(float((r * r).sum()) for leaves in self.reference for r in leaves)

    def __call__(self, model: nn.Module) -> float:
        noise = 0.0
        with torch.no_grad():
            for (args, kwargs), ref in zip(self.batches, self.reference):
                out = _float_leaves(model(*args, **kwargs))
                noise += sum(float(((r - o) ** 2).sum()) for r, o in zip(ref, out))
        if not math.isfinite(noise):
            return -math.inf
        if noise == 0.0:
            return math.inf
        return 10.0 * math.log10(self.signal / noise) if self.signal > 0 else -math.inf
