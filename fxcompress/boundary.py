"""What :func:`fxcompress.run` checks and copies at its boundary, before any work.

Everything a caller passes is checked here, and every failure raises an
:mod:`fxcompress.errors` type naming the argument (and the tensor) at fault,
before the model is copied or traced:

* the arguments' types and values: ``backend``, ``seed``, ``progress``, the
  callables ``eval_fn``/``loss_fn``, the shape of ``calibration_data`` (an
  iterable of batches, not a tensor; re-iterable when several passes read it);
* the example inputs: no empty tensor (nothing to check a rewrite with), no
  NaN/Inf in a floating-point input (:class:`~fxcompress.errors.InputError`
  naming the input and how many values);
* the model's weights: no NaN/Inf in a parameter, no NaN in a buffer (an
  attention mask may hold -inf), named by their state-dict key;
* the task metric ``eval_fn`` returns: a real number (checked on its first
  call, before any pass runs).

:func:`clone_inputs` copies the example inputs once, so nothing run() does
(tracing, passes, checks) can write into the caller's tensors.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .errors import ConfigError, InputError, MetricError

__all__ = ["clone_inputs", "check_example_inputs", "check_weights", "check_run_arguments", "check_data",
           "check_metric", "backends", "first_non_float32", "NEED_HINTS"]


def clone_inputs(value: Any) -> Any:
    """A copy of a (nested) input structure in which every tensor is a fresh clone."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone().requires_grad_(value.requires_grad)
    if isinstance(value, Mapping):
        return {k: clone_inputs(v) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a NamedTuple keeps its type
        return type(value)(*(clone_inputs(v) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(clone_inputs(v) for v in value)
    return value


def _leaves(value: Any, path: str) -> Iterable[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from _leaves(v, f"{path}[{k!r}]")
    elif isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            yield from _leaves(v, f"{path}[{i}]")


def _non_finite(t: torch.Tensor) -> str | None:
    """'3 NaN and 1 Inf of 384 values' for a floating tensor holding any, else None."""
    if not (t.is_floating_point() or t.is_complex()) or bool(torch.isfinite(t).all()):
        return None
    nan = int(torch.isnan(t).sum())
    inf = int(torch.isinf(t).sum())
    parts = [f"{nan} NaN"] * bool(nan) + [f"{inf} Inf"] * bool(inf)
    return f"{' and '.join(parts)} of {t.numel()} values"


def check_example_inputs(args: tuple, kwargs: dict) -> None:
    """InputError for an empty example tensor or one holding NaN/Inf, naming the input."""
    named = [(f"example input #{i}", a) for i, a in enumerate(args)]
    named += [(f"example input {k!r}", v) for k, v in kwargs.items()]
    for name, value in named:
        for path, t in _leaves(value, name):
            if t.numel() == 0:
                raise InputError(f"{path} is empty (shape {tuple(t.shape)}): shapes, MACs and the checks "
                                 f"after every pass need at least one sample; give a batch of one or more")
            problem = _non_finite(t)
            if problem is not None:
                raise InputError(f"{path} holds {problem}: the checks after every pass compare outputs on "
                                 f"the example inputs; give finite values")


def check_weights(model: nn.Module) -> None:
    """InputError for a parameter holding NaN/Inf or a buffer holding NaN, named by its state key."""
    params = {id(p) for p in model.parameters()}
    for name, t in model.state_dict(keep_vars=True).items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            continue
        if id(t) in params:
            problem = _non_finite(t.detach())
        else:  # a buffer: -inf is a legitimate mask value, NaN never is
            nan = int(torch.isnan(t).sum())
            problem = f"{nan} NaN of {t.numel()} values" if nan else None
        if problem is not None:
            kind = "parameter" if id(t) in params else "buffer"
            raise InputError(f"the model's {kind} {name!r} holds {problem}; compressing it would only spread "
                             f"them: load or train finite weights first")


def backends() -> tuple[str, ...]:
    """The backends lowered modules run on (imported on use: the quant runtime is not light)."""
    from .quant.lowered_base import BACKENDS

    return tuple(BACKENDS)


def check_run_arguments(*, backend: Any, seed: Any, progress: Any, eval_fn: Any, loss_fn: Any) -> None:
    """ConfigError for a run() argument of the wrong type or value."""
    if not isinstance(backend, str) or backend not in backends():
        raise ConfigError(f"backend must be one of {backends()} ('reference' runs anywhere), got {backend!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
    if not isinstance(progress, bool):
        raise ConfigError(f"progress must be True or False, got {progress!r}")
    for name, fn in (("eval_fn", eval_fn), ("loss_fn", loss_fn)):
        if fn is not None and not callable(fn):
            raise ConfigError(f"{name} must be a function (or None), got {type(fn).__name__} {fn!r}")


def check_data(data: Any, readers: list[str]) -> None:
    """ConfigError when ``calibration_data`` is not an iterable of batches, or is a one-shot
    iterator that more than one pass (``readers``) would read."""
    if data is None:
        return
    if isinstance(data, (torch.Tensor, str, bytes, Mapping)) or not isinstance(data, Iterable):
        hint = " (for one tensor of samples, give [x] or list(x.split(batch_size)))" \
            if isinstance(data, torch.Tensor) else ""
        raise ConfigError(f"calibration_data must be an iterable of batches (a list or a DataLoader), "
                          f"got {type(data).__name__}{hint}")
    if len(readers) > 1 and iter(data) is data:
        raise ConfigError(f"calibration_data is a one-shot iterator ({type(data).__name__}), but passes "
                          f"{readers} each read it: the first would use it up; give a list or a DataLoader")


def check_metric(value: Any, where: str) -> float:
    """What an ``eval_fn`` returned (``where``: when), as a float; :class:`MetricError` for
    anything but one finite real number (None, a string, a bool, NaN, Inf)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise MetricError(f"eval_fn returned {type(value).__name__} {value!r} {where}; it must return one "
                          f"finite number (the task metric, higher is better)")
    number = float(value)
    if not math.isfinite(number):
        raise MetricError(f"eval_fn returned {number} {where}; it must return a finite number (check the "
                          f"model's outputs and the evaluation data)")
    return number


#: What to tell a caller who left out an input a pass ``needs`` (Pass.needs names PassContext fields).
NEED_HINTS = {
    "calibration_data": "give calibration_data=[batch, ...] to fxcompress.run (a list or DataLoader of "
                        "representative input batches; (inputs, target) pairs for training)",
    "loss_fn": "give loss_fn=fn(outputs, target) -> scalar tensor to fxcompress.run",
    "eval_fn": "give eval_fn=fn(model) -> float to fxcompress.run",
    "teacher": "give teacher=<model> to fxcompress.run (typically the uncompressed model) to distill from",
}


def first_non_float32(model: torch.nn.Module | None, args: tuple, kwargs: dict) -> str | None:
    """A phrase naming the first floating tensor (the model's state or an example input) that is not
    float32; the state of fxcompress's own modules (observers, quantizers) is not looked at."""
    if model is not None:
        # fxcompress's own modules (observers keep float64 histograms) are not the model's precision.
        ours = [path + "." for path, m in model.named_modules() if path and getattr(type(m), "fxc_role", None)]
        for name, t in model.state_dict(keep_vars=True).items():
            if any(name.startswith(prefix) for prefix in ours):
                continue
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float32:
                return f"the model's {name!r} is {str(t.dtype).removeprefix('torch.')}"
    inputs = [(f"#{i}", a) for i, a in enumerate(args)] + [(repr(k), v) for k, v in kwargs.items()]
    for name, value in inputs:
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float32:
            return f"example input {name} is {str(value.dtype).removeprefix('torch.')}"
    return None
