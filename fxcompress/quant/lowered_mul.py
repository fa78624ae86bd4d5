"""The uint8 product of two quantized values (a squeeze-excitation gate built for onnxruntime).

``requant(deq(a) * deq(b))`` is a function of two bytes: it is looked up in the table of all
65536 code pairs (:func:`fxcompress.oplib.arith.mul_uint8`), computed once per qparams from
the folded graph's own float ops, so it equals the folded graph's product exactly. The
models built for onnxruntime quantize both operands of a gate ``x * gains`` (a depthwise
conv's activation and the sigmoid of the gate's last conv, both tables), so onnxruntime runs
it as ``QLinearMul``, whose rounding ``arithmetic="onnxruntime"`` computes.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from fxcompress.errors import InputError
from fxcompress.quant.kernels import Support
from fxcompress.quant.lowered_base import BinaryCodesModule, run_op, summarize

__all__ = ["QuantMul"]


class QuantMul(BinaryCodesModule):
    """``requant(deq(a) * deq(b))`` of two uint8 activations (broadcast), by code-pair table.

    ``arithmetic="onnxruntime"`` computes onnxruntime's ``QLinearMul`` instead (its zero point
    added before the rounding: :mod:`fxcompress.oplib.arith_onnxruntime`). The output takes
    the broadcast shape, channels-last for a channels-last 4-D ``a``.
    """

    def __init__(self, *, backend: str = "x86", arithmetic: str = "onednn") -> None:
        super().__init__(backend, arithmetic)

    def config(self) -> dict[str, Any]:
        return {"backend": self.backend, "arithmetic": self.arithmetic}

    def onnxruntime_problem(self) -> str | None:
        """Why this product cannot compute onnxruntime's QLinearMul arithmetic: never."""
        return None

    def kernel_support(self, a_shape: Sequence[int], b_shape: Sequence[int]) -> Support:
        """Always: both backends look the product up in the same table (no oneDNN kernel)."""
        return Support(True)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.dtype != torch.uint8 or b.dtype != torch.uint8:
            raise InputError(f"QuantMul expects uint8 activations, got {a.dtype} and {b.dtype}")
        op = "mul_onnxruntime" if self.arithmetic == "onnxruntime" else "mul"
        return run_op(op, a, b, self.input_scale, self.input_zero_point, self.other_scale, self.other_zero_point,
                      self.output_scale, self.output_zero_point)

    def extra_repr(self) -> str:
        return (f"bits=8, a=({summarize(self.input_scale)}, {int(self.input_zero_point)}), "
                f"b=({summarize(self.other_scale)}, {int(self.other_zero_point)}), "
                f"out=({summarize(self.output_scale)}, {int(self.output_zero_point)}), backend={self.backend}"
                + (f", arithmetic={self.arithmetic}" if self.arithmetic != "onednn" else ""))
