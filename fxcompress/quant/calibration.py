"""Calibration batches: how an item of ``calibration_data`` becomes the model's inputs.

An item is one batch: a tensor (the one input), a tuple or list of
positional inputs, or a dict of keyword inputs.  A labelled ``(inputs,
target)`` pair is recognised, and its target dropped, when the model takes
exactly one input and the item is a 2-tuple (or list) whose first element is
a tensor with the example input's number of dims and the same size in every
dim but the first (the batch).  Otherwise a 2-tuple is two positional inputs.

Every tensor input must have the example input's dtype, number of dims and
non-batch sizes, and be finite (floating point); anything else raises
:class:`~fxcompress.errors.CalibrationDataError` (a ``CalibrationError`` and an
``InputError``) naming the batch and the input, with what was expected and
what was given.  The model is called on copies of the batch's tensors, so a
model that writes into its inputs leaves the caller's data as it was.
"""

from __future__ import annotations

from typing import Any

import torch

from fxcompress.errors import CalibrationDataError

__all__ = ["batch_inputs", "batch_size"]


def _describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')} {tuple(t.shape)}"


def _same_layout(t: Any, ref: Any) -> bool:
    return (isinstance(t, torch.Tensor) and isinstance(ref, torch.Tensor) and t.dim() == ref.dim()
            and t.dim() > 0 and t.shape[1:] == ref.shape[1:])


def _split(item: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    if isinstance(item, dict):
        return (), dict(item)
    if isinstance(item, (tuple, list)):
        single = len(args) + len(kwargs) == 1 and len(args) == 1
        if single and len(item) == 2 and _same_layout(item[0], args[0]):
            return (item[0],), {}  # (inputs, target): the target is not the model's
        return tuple(item), {}
    return (item,), {}


def _check(name: str, value: Any, ref: Any, index: int) -> None:
    if not isinstance(ref, torch.Tensor):
        return
    if not isinstance(value, torch.Tensor):
        raise CalibrationDataError(f"calibration batch {index}: input {name} should be a tensor like the example "
                               f"input ({_describe(ref)}), got {type(value).__name__}")
    if value.dtype != ref.dtype or value.dim() != ref.dim() or value.shape[1:] != ref.shape[1:]:
        expected = f"{str(ref.dtype).removeprefix('torch.')} (N, {', '.join(map(str, ref.shape[1:]))})"
        raise CalibrationDataError(f"calibration batch {index}: input {name} is {_describe(value)}, expected "
                               f"{expected} like the example input (any batch size)")
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise CalibrationDataError(f"calibration batch {index}: input {name} contains NaN or Inf; clean or "
                               f"normalise the calibration data")


def batch_inputs(item: Any, index: int, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``(args, kwargs)`` to call the model with for calibration item number ``index``.

    ``args``/``kwargs`` are the example inputs, the reference for the checks
    described in the module docstring.
    """
    b_args, b_kwargs = _split(item, args, kwargs)
    if len(b_args) != len(args) or set(b_kwargs) != set(kwargs):
        raise CalibrationDataError(
            f"calibration batch {index} has {len(b_args)} positional inputs and keywords {sorted(b_kwargs)}; "
            f"the example inputs have {len(args)} positional and keywords {sorted(kwargs)}"
        )
    for i, (value, ref) in enumerate(zip(b_args, args)):
        _check(f"#{i}", value, ref, index)
    for key, value in b_kwargs.items():
        _check(repr(key), value, kwargs[key], index)
    return tuple(map(_copy, b_args)), {k: _copy(v) for k, v in b_kwargs.items()}


def _copy(value: Any) -> Any:
    # One memcpy per batch, small next to the forward it feeds.
    return value.clone() if isinstance(value, torch.Tensor) else value


def batch_size(args: tuple, kwargs: dict) -> int:
    """The batch size of a batch: dim 0 of its first tensor input (0 if it has none)."""
    first = next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.dim() > 0), None)
    return int(first.shape[0]) if first is not None else 0
