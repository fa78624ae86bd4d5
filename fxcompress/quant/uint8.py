"""Portable uint8 activation helpers: (de)quantization, post-ops, max pooling.

Defined in the operator library (:mod:`fxcompress.oplib.arith`, which documents the
rounding conventions and measured costs), so that a deployed model computes exactly what
fxcompress computes; this module keeps the names where fxcompress code and users import
them.
"""

from fxcompress.oplib import arith
from fxcompress.oplib.arith import *  # noqa: F403  (every name of the arithmetic, importable from here)

__all__ = list(arith.__all__)
