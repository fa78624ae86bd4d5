"""A lowered module's last eager kernel call, replayed while nothing it was chosen from changed.

Eagerly, a lowered int8 conv spends nearly as long choosing its kernel as a small kernel
takes to run: reading six qparam tensors, stamping and looking up the packed weight in the
operator cache (:mod:`fxcompress.oplib.cache`), building the cache key, checking
preconditions. Measured on one thread (AMD EPYC): about 30 us per call against 75 us for
the oneDNN call of a 160-channel 7x7 1x1 conv; with plans an int8 mobilenet_v2 forward takes
0.88x the time (``benchmarks/eager_plan.py``). The choice
depends only on the module's configuration, its state tensors and the input's per-sample
shape, so a module remembers it as an :class:`EagerPlan` and calls the kernel directly
while those are unchanged.

Guarantees:

* a plan is used only where it gives what the operator computes: the same kernel object
  the operator would call (:func:`fxcompress.oplib.impl.conv_plan` makes it), for an input
  of the same dtype and per-sample shape, while every state tensor is the same object at
  the same version counter (``load_state_dict``, ``.to()``, an in-place edit, a new
  tensor assigned: each is seen, and the next call chooses again);
* setting any attribute of the module (``post_op``, ``backend``, ...) drops its plan
  (:meth:`LoweredModule.__setattr__ <fxcompress.quant.lowered_base.LoweredModule>`);
* never used while a compiler or tracer records the call (``torch.compile``,
  ``torch.export``, ``torch.jit.trace``): those see the registered operators;
* never copied, pickled or saved with the module (the kernel holds oneDNN's opaque packed
  weight); a copy chooses again on its first call;
* never replayed where a state tensor is an inference tensor (made under
  ``torch.inference_mode()``: it has no version counter, so an edit could not be seen):
  such a module chooses on every call, as the operator does.
"""

from __future__ import annotations

import contextlib
import operator
from typing import Callable, Iterator, Mapping

import torch

__all__ = ["EagerPlan", "may_plan", "disabled"]

_DISABLED = 0


def may_plan() -> bool:
    """Whether a module may use or make a plan for this call: run eagerly, outside :func:`disabled`."""
    # The compiler checks first: dynamo folds them to constants and never reads _DISABLED.
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing() or _DISABLED)


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within this block (process-wide) lowered modules choose their kernel through the operator
    on every call: to check a result without plans, or to measure what they save
    (``benchmarks/eager_plan.py``)."""
    global _DISABLED
    _DISABLED += 1
    try:
        yield
    finally:
        _DISABLED -= 1


class EagerPlan:
    """The kernel call chosen for inputs of one per-sample shape, and what it was chosen from.

    ``call`` is None where the operator takes its reference path for that shape (the
    plan then only says "choose through the operator", at the cost of the check).
    """

    __slots__ = ("sample_shape", "tensors", "versions", "call", "output_shape")

    def __init__(self, sample_shape: torch.Size, tensors: tuple, versions: tuple,
                 call: Callable | None, output_shape: torch.Size | None = None) -> None:
        self.sample_shape, self.tensors, self.versions = sample_shape, tensors, versions
        self.call, self.output_shape = call, output_shape

    @classmethod
    def make(cls, x: torch.Tensor, buffers: Mapping[str, torch.Tensor | None], call: Callable | None,
             output_shape: torch.Size | None = None) -> EagerPlan:
        """The plan for ``x``'s call with the module's ``buffers`` as they are now. Where a
        buffer is an inference tensor (no version counter: its edits could not be seen) it
        serves this call only and never :meth:`holds` again."""
        tensors = tuple(buffers.values())
        try:
            versions: tuple | None = tuple([t._version for t in tensors if t is not None])
        except RuntimeError:  # an inference tensor
            versions = None
        return cls(x.shape[1:], tensors, versions, call, output_shape)

    def holds(self, x: torch.Tensor, buffers: Mapping[str, torch.Tensor | None]) -> bool:
        """Whether this plan is valid for ``x`` (uint8, checked by the caller) and ``buffers``."""
        tensors = tuple(buffers.values())
        return (self.versions is not None and x.shape[1:] == self.sample_shape and len(tensors) == len(self.tensors)
                and all(map(operator.is_, tensors, self.tensors))
                and tuple([t._version for t in tensors if t is not None]) == self.versions)
