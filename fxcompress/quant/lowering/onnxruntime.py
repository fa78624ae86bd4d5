"""``lower(arithmetic="onnxruntime")``: lowered ops switched to onnxruntime's QLinear arithmetic.

A model deployed with onnxruntime runs its QDQ export there: onnxruntime fuses each
``DequantizeLinear -> Conv -> QuantizeLinear`` into ``QLinearConv`` and each quantized add into
``QLinearAdd``, and requantizes in its own order (:mod:`fxcompress.oplib.arith_onnxruntime`).
Switched to that order, the lowered model computes, on fxcompress's kernels, the codes
onnxruntime will compute: what is validated in PyTorch is what runs there.

Switched: every :class:`~fxcompress.quant.lowered.Quantize` and
:class:`~fxcompress.quant.lowered.QuantizeProduct` (rounded as ``QuantizeLinear``), every
:class:`~fxcompress.quant.lowered.QuantAdd` (``QLinearAdd``) and
:class:`~fxcompress.quant.lowered.QuantMul` (``QLinearMul``), every global
:class:`~fxcompress.quant.lowered.QuantAdaptiveAvgPool2d` (``QLinearGlobalAveragePool``) and
every uint8-output conv without a fused residual whose post-op is none / ReLU / hardtanh
(``QLinearConv``). The others keep oneDNN's order, each reported with the reason: convs
onnxruntime runs in float (a fused residual add, SiLU, a float output), where no integer
order would match it, pools to other sizes, and the ops whose onnxruntime kernels are not
reproduced here (:data:`NOT_REPRODUCED`). Max pools,
dequantization and activation tables (``GatherElements``) are exact in both.
"""

from __future__ import annotations

from collections import Counter

from torch import fx

from fxcompress.quant.lowered import QuantLinear
from fxcompress.quant.lowered_base import LoweredModule, check_arithmetic

__all__ = ["NOT_REPRODUCED", "use_onnxruntime_arithmetic"]

#: Lowered ops that round with onnxruntime kernels whose arithmetic is not reproduced here.
NOT_REPRODUCED: dict[type, str] = {
    QuantLinear: "onnxruntime's QGemm / MatMul requantization is not reproduced (a uint8 linear keeps oneDNN's "
                 "order; a float32-output one runs in float there)",
}


def use_onnxruntime_arithmetic(gm: fx.GraphModule) -> tuple[dict[str, int], dict[str, str]]:
    """Switch the lowered modules of ``gm`` that can compute onnxruntime's arithmetic to it
    (modules the lowering made, never the caller's). Returns the switched count per module
    type and, per module path left in oneDNN's order, the reason."""
    switched: Counter[str] = Counter()
    kept: dict[str, str] = {}
    for path, module in gm.named_modules():
        if not isinstance(module, LoweredModule):
            continue
        problem_of = getattr(module, "onnxruntime_problem", None)
        if problem_of is None:
            if type(module) in NOT_REPRODUCED:
                kept[path] = NOT_REPRODUCED[type(module)]
            continue
        problem = problem_of()
        if problem is None:
            module.arithmetic = check_arithmetic("onnxruntime")
            switched[type(module).__name__] += 1
        else:
            kept[path] = problem
    return dict(switched), kept
