"""Thin, safe wrappers over the integer CPU kernels this torch build ships.

Defined in the operator library (:mod:`fxcompress.oplib.kernels`, where the preconditions
and facts about each kernel are documented), which the lowered models' operators call at
run time with or without fxcompress; this module keeps the names where fxcompress code
and users import them. Under fxcompress, a precondition that does not hold raises
:class:`~fxcompress.errors.LoweringError` (installed in the library by
:mod:`fxcompress.quant`).
"""

from fxcompress.oplib.kernels import (
    Support,
    CONV_POST_OPS,
    CONV_POST_OPS_BY_DIMS,
    LINEAR_POST_OPS,
    POST_OPS,
    INT4_GROUP_SIZES,
    onednn_int8_support,
    int8_weight_support,
    supports_qconv,
    supports_qlinear,
    conv_output_size,
    supports_int8pack_mm,
    supports_int4pack_mm,
    QConvKernel,
    QLinearKernel,
    int_mm,
    int8pack_mm,
    int4pack_weight,
    int4pack_scales_and_zeros,
    int4pack_mm,
)

__all__ = [
    "Support",
    "CONV_POST_OPS",
    "CONV_POST_OPS_BY_DIMS",
    "LINEAR_POST_OPS",
    "POST_OPS",
    "INT4_GROUP_SIZES",
    "onednn_int8_support",
    "int8_weight_support",
    "supports_qconv",
    "supports_qlinear",
    "conv_output_size",
    "supports_int8pack_mm",
    "supports_int4pack_mm",
    "QConvKernel",
    "QLinearKernel",
    "int_mm",
    "int8pack_mm",
    "int4pack_weight",
    "int4pack_scales_and_zeros",
    "int4pack_mm",
]
