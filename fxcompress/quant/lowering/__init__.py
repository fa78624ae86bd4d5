"""Graph-side helpers of the lowering passes (``lower``, ``quantize_dynamic``,
``quantize_weights``, ``cast``): module swaps and backend resolution.

The passes in ``passes/`` stay thin readable rewrites; what they share lives here.
"""

from fxcompress.quant.lowering.swap import (
    Built, SwapResult, check_backend_option, resolve_backend, swap_linears,
)

__all__ = ["Built", "SwapResult", "check_backend_option", "resolve_backend", "swap_linears"]
