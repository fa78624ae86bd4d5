"""The uint8 residual add between int8 convs.

aten's uint8 ``+`` wraps around and ``onednn::qadd`` reads its uint8 inputs as int8 on its
vectorised path (wrong for values > 127), so neither is used: a same-shape add runs as a
oneDNN depthwise 1x1 int8 conv with all-ones weights and the other operand fused as
``sum`` (exact, requantized inside the kernel); other shapes take the float reference
(benchmarks/kernels.py has the timings).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from fxcompress.errors import InputError
from fxcompress.quant.kernels import Support, supports_qconv
from fxcompress.quant.lowered_base import BinaryCodesModule, run_op, summarize

__all__ = ["QuantAdd"]

_REFERENCE_ONLY = Support(False, "backend='reference' was requested")


class QuantAdd(BinaryCodesModule):
    """``requant(deq(a) + deq(b))`` (optionally ReLU-ed) of two uint8 activations.

    Same-shape 4-D inputs run as a oneDNN depthwise 1x1 int8 conv of ``a`` (weights 1)
    with ``b`` fused as ``sum``; ``b`` is copied first because that kernel writes into it.
    Other shapes (broadcasting, other ranks) take the float reference.

    ``arithmetic="onnxruntime"`` computes onnxruntime's ``QLinearAdd`` instead (a ReLU as the
    clamp at the code of 0.0; :mod:`fxcompress.oplib.arith_onnxruntime`).
    """

    def __init__(self, *, relu: bool = False, backend: str = "x86", arithmetic: str = "onednn") -> None:
        super().__init__(backend, arithmetic)
        self.relu = bool(relu)

    def config(self) -> dict[str, Any]:
        return {"relu": self.relu, "backend": self.backend, "arithmetic": self.arithmetic}

    def onnxruntime_problem(self) -> str | None:
        """Why this add cannot compute onnxruntime's QLinearAdd arithmetic: never."""
        return None

    def kernel_support(self, a_shape: Sequence[int], b_shape: Sequence[int]) -> Support:
        """Whether the fused depthwise-conv kernel runs for these input shapes, or why not."""
        if self.backend == "reference":
            return _REFERENCE_ONLY
        if tuple(a_shape) != tuple(b_shape) or len(a_shape) != 4:
            return Support(False, f"only same-shape 4-D adds are fused, got {tuple(a_shape)} + {tuple(b_shape)}")
        return supports_qconv((a_shape[1], 1, 1, 1), a_shape, stride=(1, 1), padding=(0, 0),
                              dilation=(1, 1), groups=a_shape[1], post_op="relu" if self.relu else "none",
                              residual=True)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.dtype != torch.uint8 or b.dtype != torch.uint8:
            raise InputError(f"QuantAdd expects uint8 activations, got {a.dtype} and {b.dtype}")
        op = "add_onnxruntime" if self.arithmetic == "onnxruntime" else "add"
        return run_op(op, a, b, self.input_scale, self.input_zero_point, self.other_scale,
                      self.other_zero_point, self.output_scale, self.output_zero_point, self.relu,
                      self.use_kernels)

    def extra_repr(self) -> str:
        return (f"relu={self.relu}, bits=8, a=({summarize(self.input_scale)}, {int(self.input_zero_point)}), "
                f"b=({summarize(self.other_scale)}, {int(self.other_zero_point)}), "
                f"out=({summarize(self.output_scale)}, {int(self.output_zero_point)}), backend={self.backend}"
                + (f", arithmetic={self.arithmetic}" if self.arithmetic != "onednn" else ""))
