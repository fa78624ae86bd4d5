"""Rebuildable caches of the operators: prepacked kernels and dequantized weights.

oneDNN's prepacked weights are opaque tensors (no deepcopy, pickling, ``torch.save``,
safetensors or ``torch.export.save``), so a model never holds them: its state is plain
int8/uint8/float32 tensors, and the operators keep what they derive from those tensors
here, outside any module or program, rebuilt on first use in each process.

An entry belongs to one weight tensor *object* and is valid while that object lives and
neither it nor the tensors the entry was derived from (scales, bias, zero points) have
been changed in place: each is stamped with ``(id, version counter)``. So
``load_state_dict`` (an in-place copy), an edit under ``torch.no_grad()``, ``.to()`` or a
copy of the module (new tensor objects) all lead to a rebuild, and no stale packed weight
is ever used. Inference tensors (made under ``torch.inference_mode()``) have no version
counter: an in-place edit of one *inside* inference mode is not seen; call
:func:`forget` after it.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Any, Callable, Hashable

import torch

__all__ = ["MAX_SHAPES", "per_weight", "remember", "shared", "scalar", "forget", "entries"]

#: Per-input-shape entries kept for one weight (each may hold a packed copy of it).
MAX_SHAPES = 8
# Kernels that depend on shapes and qparams only (the all-ones weights of pools and adds).
_MAX_SHARED = 64


def _stamp(tensors: tuple[torch.Tensor | None, ...]) -> tuple[tuple[int, int], ...]:
    out = []
    for t in tensors:
        if t is None:
            out.append((0, 0))
            continue
        try:
            version = t._version
        except RuntimeError:  # an inference tensor: no version counter
            version = -1
        out.append((id(t), version))
    return tuple(out)


class _Entry:
    __slots__ = ("ref", "stamp", "values")

    def __init__(self, ref: weakref.ref, stamp: tuple, values: OrderedDict) -> None:
        self.ref, self.stamp, self.values = ref, stamp, values


_ENTRIES: dict[int, _Entry] = {}
_SHARED: OrderedDict[Hashable, Any] = OrderedDict()


def _drop(key: int, ref: weakref.ref) -> None:
    entry = _ENTRIES.get(key)
    if entry is not None and entry.ref is ref:
        del _ENTRIES[key]


def per_weight(weight: torch.Tensor, *derived_from: torch.Tensor | None) -> OrderedDict:
    """The cache entry of ``weight`` (a dict to fill), empty again whenever ``weight`` or
    any of ``derived_from`` changed since the entry was made."""
    key, stamp = id(weight), _stamp((weight, *derived_from))
    entry = _ENTRIES.get(key)
    if entry is None or entry.ref() is not weight or entry.stamp != stamp:
        ref = weakref.ref(weight, lambda r, k=key: _drop(k, r))
        entry = _ENTRIES[key] = _Entry(ref, stamp, OrderedDict())
    return entry.values


def remember(values: OrderedDict, key: Hashable, build: Callable[[], Any]) -> Any:
    """``values[key]``, built on first use. String keys (per-weight facts, a dequantized copy) stay;
    of the others (per input shape) at most :data:`MAX_SHAPES` are kept, the oldest dropped."""
    if key in values:
        return values[key]
    if not isinstance(key, str):
        shapes = [k for k in values if not isinstance(k, str)]
        if len(shapes) >= MAX_SHAPES:
            del values[shapes[0]]
    values[key] = found = build()
    return found


def shared(key: Hashable, build: Callable[[], Any]) -> Any:
    """A cache entry that depends on ``key`` alone (shapes and qparams), least recently used dropped."""
    found = _SHARED.get(key)
    if found is None:
        if len(_SHARED) >= _MAX_SHARED:
            _SHARED.popitem(last=False)
        found = _SHARED[key] = build()
    else:
        _SHARED.move_to_end(key)
    return found


_SCALARS: dict[int, tuple[weakref.ref, int, float | int]] = {}


def scalar(t: torch.Tensor) -> float | int:
    """``t.item()`` of a one-element qparam tensor, remembered while ``t`` lives unchanged.

    A lowered model reads a few scales and zero points per op and call; each ``.item()`` is a
    dispatcher round trip (about 3 us, 5% of a small mobile net's int8 forward). Stamped like
    the weight entries, so an in-place change (``load_state_dict``) is seen; inference tensors
    (no version counter) are read every time.
    """
    try:
        version = t._version
    except RuntimeError:  # an inference tensor
        return t.item()
    key = id(t)
    found = _SCALARS.get(key)
    if found is not None and found[0]() is t and found[1] == version:
        return found[2]
    value = t.item()
    _SCALARS[key] = (weakref.ref(t, lambda r, k=key: _drop_scalar(k, r)), version, value)
    return value


def _drop_scalar(key: int, ref: weakref.ref) -> None:
    found = _SCALARS.get(key)
    if found is not None and found[0] is ref:
        del _SCALARS[key]


def forget(*weights: torch.Tensor | None) -> None:
    """Drop the entries of these weight tensors (after editing an inference tensor in place)."""
    for w in weights:
        if w is not None:
            _ENTRIES.pop(id(w), None)


def entries(weight: torch.Tensor) -> int:
    """How many per-shape entries ``weight`` has now (for tests and reports)."""
    entry = _ENTRIES.get(id(weight))
    if entry is None or entry.ref() is not weight:
        return 0
    return sum(not isinstance(k, str) for k in entry.values)
