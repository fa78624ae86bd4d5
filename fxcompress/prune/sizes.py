"""Sizes that remember which channels they count.

A traced model may read a channel count at run time (``c = x.size(1)``) and
use it to shape another tensor (``y.reshape(b, g, c // g, h, w)``).  That is
only sound after pruning if ``y`` loses exactly the channels ``x`` loses.  So
while analysing, sizes read off a channel dim are :class:`CountedSize` ints
that carry the atoms they count through integer arithmetic; a node that uses
one is checked by :class:`~fxcompress.prune.rules.Analyzer`.
"""

from __future__ import annotations

import operator
from typing import Any, Callable

import torch

__all__ = ["CountedSize", "provenance", "annotate_sizes"]


class CountedSize(int):
    """An ``int`` that also records the channel atoms (``atoms``) whose count it depends on."""

    atoms: tuple[torch.Tensor, ...]

    def __new__(cls, value: int, atoms: tuple[torch.Tensor, ...]) -> "CountedSize":
        obj = super().__new__(cls, value)
        obj.atoms = atoms
        return obj


def _wrap(op: Callable[[Any, Any], Any], reflected: bool = False) -> Callable[[Any, Any], Any]:
    def method(self: CountedSize, other: Any) -> Any:
        a, b = (int(other), int(self)) if reflected else (int(self), other if not isinstance(other, int) else int(other))
        result = op(a, b)
        if not isinstance(result, int) or isinstance(result, bool):
            return result
        return CountedSize(result, self.atoms + getattr(other, "atoms", ()))
    return method


for _name, _op in {"add": operator.add, "sub": operator.sub, "mul": operator.mul,
                   "floordiv": operator.floordiv, "mod": operator.mod}.items():
    setattr(CountedSize, f"__{_name}__", _wrap(_op))
    setattr(CountedSize, f"__r{_name}__", _wrap(_op, reflected=True))
CountedSize.__neg__ = lambda self: CountedSize(-int(self), self.atoms)  # type: ignore[method-assign]


def provenance(value: Any) -> list[torch.Tensor]:
    """Every atom tensor counted by the sizes inside ``value`` (nested lists/tuples/dicts)."""
    found: list[torch.Tensor] = []

    def visit(v: Any) -> None:
        if isinstance(v, CountedSize):
            found.extend(v.atoms)
        elif isinstance(v, (list, tuple)):
            for x in v:
                visit(x)
        elif isinstance(v, dict):
            for x in v.values():
                visit(x)

    visit(value)
    return found


def annotate_sizes(value: Any, dims: tuple[int, ...], ids: torch.Tensor, index: Any = None) -> Any:
    """Wrap the sizes of a tensor's channel dims in ``value`` (a ``torch.Size`` or one int)."""
    if isinstance(value, torch.Size):
        return tuple(CountedSize(v, (ids,)) if d in dims else v for d, v in enumerate(value))
    if isinstance(value, int) and isinstance(index, int):
        return CountedSize(value, (ids,)) if index in dims else value
    return value
