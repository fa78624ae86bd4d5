"""Portable uint8 activation helpers: (de)quantization, post-ops, max pooling.

Defined in the operator library (:mod:`fxcompress.oplib.arith`, which documents the
rounding conventions and measured costs), so that a deployed model computes exactly what
fxcompress computes; this module keeps the names where fxcompress code and users import
them.
"""

from fxcompress.oplib.arith import (
    quantize_uint8,
    quantize_product_uint8,
    dequantize_uint8,
    requantize_uint8,
    choose_qparams_uint8,
    quantize_per_token_int8,
    apply_post_op,
    supports_uint8_max_pool2d,
    max_pool2d_uint8,
)

__all__ = [
    "quantize_uint8",
    "quantize_product_uint8",
    "dequantize_uint8",
    "requantize_uint8",
    "choose_qparams_uint8",
    "quantize_per_token_int8",
    "apply_post_op",
    "supports_uint8_max_pool2d",
    "max_pool2d_uint8",
]
