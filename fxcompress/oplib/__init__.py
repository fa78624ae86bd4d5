"""fxcompress's operator library: the int8 kernels of lowered models as ``torch.ops.fxcompress``.

``import fxcompress.oplib`` registers the operators (:mod:`.library`) with ``torch.library``;
it imports torch and nothing else, so a program made by ``torch.export`` from a lowered
fxcompress model loads and runs where only torch and this library are installed::

    import torch
    import fxcompress.oplib  # registers torch.ops.fxcompress.*

    program = torch.export.load("model.pt2")
    y = program.module()(x)

What is here: the reference arithmetic the kernels are held to (:mod:`.arith`), the
probe of this CPU's int8 kernel path (:mod:`.isa`), checked wrappers over oneDNN's and
aten's integer kernels (:mod:`.kernels`), the rebuildable caches of packed weights
(:mod:`.cache`), each operator's computation with its per-call choice of kernel or
reference (:mod:`.impl`), the operator schemas with fake implementations for the
compilers (:mod:`.library`), and what the operators are traced as under ``torch.compile``
with inductor's freezing: direct oneDNN calls and elementwise code (:mod:`.frozen`, imported
only while compiling). fxcompress's lowered modules call the same functions, so a
model computes the same numbers eagerly, compiled, exported or loaded.
"""

from fxcompress.oplib import library
from fxcompress.oplib.cache import forget
from fxcompress.oplib.errors import KernelError, OpConfigError, OpInputError

__all__ = ["library", "forget", "KernelError", "OpConfigError", "OpInputError"]
