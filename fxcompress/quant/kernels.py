"""Thin, safe wrappers over the integer CPU kernels this torch build ships.

Defined in the operator library (:mod:`fxcompress.oplib.kernels`, where the preconditions
and facts about each kernel are documented), which the lowered models' operators call at
run time with or without fxcompress; this module keeps the names where fxcompress code
and users import them. Under fxcompress, a precondition that does not hold raises
:class:`~fxcompress.errors.LoweringError` (installed in the library by
:mod:`fxcompress.quant`).
"""

from fxcompress.oplib.kernels import *  # noqa: F401,F403  (the library's names, re-exported)
from fxcompress.oplib.kernels import __all__  # noqa: F401
