"""The arithmetic of the int8 kernels, with portable torch ops: the reference they are held to.

Defined in the operator library (:mod:`fxcompress.oplib.arith`, which also documents the
arithmetic step by step), so that a deployed model computes exactly what fxcompress
computes; the folded graph (:class:`~fxcompress.quant.layers.FoldedLayer`) and the
reference path of the lowered modules both use these functions, so a folded model and
its reference lowering agree exactly, on any CPU.
"""

from fxcompress.oplib.arith import accumulate, add_dequantized, rescale

__all__ = ["accumulate", "rescale", "add_dequantized"]
