"""Which integer arithmetic this process's oneDNN int8 kernels implement.

The probe lives in the operator library (:mod:`fxcompress.oplib.isa`, which the lowered
models' operators use at run time, with or without fxcompress); this module keeps its
names where fxcompress code and users import them.
"""

from fxcompress.oplib.isa import PAIR_LIMIT, Int8Arithmetic, expected_isa, int8_arithmetic, pair_overflow

__all__ = ["Int8Arithmetic", "int8_arithmetic", "expected_isa", "pair_overflow", "PAIR_LIMIT"]
