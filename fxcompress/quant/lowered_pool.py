"""uint8 pools between int8 convs: max pool and adaptive average pool (the residual add is
:mod:`.lowered_add`).

They keep activations uint8 (channels-last) so consecutive int8 ops never round-trip
through float. Why these implementations (torch 2.14.1, 1 thread, see
benchmarks/kernels.py): aten's uint8 ``max_pool2d`` raises on channels-last input and
is ~180x slower than ATen's ``quantized::max_pool2d`` on NCHW; aten has no uint8
average pool and uint8 ``+`` wraps around; ``onednn::qadd`` reads its uint8 inputs as
int8 on its vectorised path (wrong for values > 127), so it is not used. Average pooling
with equal windows therefore runs as a oneDNN depthwise int8 conv with all-ones weights
(exact integer sums, requantized inside the kernel), other cases take the float reference.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from fxcompress.errors import InputError, LoweringError
from fxcompress.quant.kernels import Support, supports_qconv
from fxcompress.quant.lowered_base import LoweredModule, as_pair, check_arithmetic, run_op, summarize
from fxcompress.quant.uint8 import supports_uint8_max_pool2d

__all__ = ["QuantMaxPool2d", "QuantAdaptiveAvgPool2d"]

_REFERENCE_ONLY = Support(False, "backend='reference' was requested")


def _check_uint8_4d(x: torch.Tensor, where: str) -> None:
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise InputError(f"{where} expects a 4-D uint8 activation, got {x.dim()}-D {x.dtype}")


class QuantMaxPool2d(LoweredModule):
    """Exact max pool of a uint8 activation; the qparams pass through unchanged (no state)."""

    def __init__(self, kernel_size: int | Sequence[int], stride: int | Sequence[int] | None = None,
                 padding: int | Sequence[int] = 0, dilation: int | Sequence[int] = 1,
                 ceil_mode: bool = False, *, backend: str = "x86") -> None:
        super().__init__(backend)
        self.kernel_size = as_pair(kernel_size, "kernel_size")
        self.stride = self.kernel_size if stride is None else as_pair(stride, "stride")
        self.padding, self.dilation = as_pair(padding, "padding"), as_pair(dilation, "dilation")
        self.ceil_mode = bool(ceil_mode)

    @classmethod
    def from_float(cls, pool: nn.MaxPool2d, *, backend: str = "x86") -> QuantMaxPool2d:
        if not isinstance(pool, nn.MaxPool2d) or pool.return_indices:
            raise LoweringError(f"QuantMaxPool2d.from_float needs an nn.MaxPool2d without indices, got {pool!r}")
        return cls(pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.ceil_mode,
                   backend=backend)

    def config(self) -> dict[str, Any]:
        return {"kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": list(self.padding), "dilation": list(self.dilation),
                "ceil_mode": self.ceil_mode, "backend": self.backend}

    def kernel_support(self) -> Support:
        """Whether ATen's uint8 ``quantized::max_pool2d`` runs, or why the views version does."""
        if self.backend == "reference":
            return _REFERENCE_ONLY
        if not supports_uint8_max_pool2d():
            return Support(False, "this torch build has no quantized::max_pool2d CPU kernel")
        return Support(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_uint8_4d(x, "QuantMaxPool2d")
        return run_op("max_pool2d", x, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode,
                      self.use_kernels)

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, ceil_mode={self.ceil_mode}, bits=8 (qparams pass "
                f"through), backend={self.backend}")


class QuantAdaptiveAvgPool2d(LoweredModule):
    """uint8 adaptive average pool with requantization to the output qparams.

    ``arithmetic="onnxruntime"`` (a global pool: output ``(1, 1)``) computes onnxruntime's
    ``QLinearGlobalAveragePool`` instead (:mod:`fxcompress.oplib.arith_onnxruntime`)."""

    def __init__(self, output_size: int | Sequence[int], *, backend: str = "x86", arithmetic: str = "onednn") -> None:
        super().__init__(backend)
        self.output_size = as_pair(output_size, "output_size")
        self.arithmetic = check_arithmetic(arithmetic, self.onnxruntime_problem())
        self.register_qparams("input")
        self.register_qparams("output")

    @classmethod
    def from_float(cls, pool: nn.AdaptiveAvgPool2d, input_scale: float | torch.Tensor,
                   input_zero_point: int | torch.Tensor, output_scale: float | torch.Tensor,
                   output_zero_point: int | torch.Tensor, *, backend: str = "x86") -> QuantAdaptiveAvgPool2d:
        size = pool.output_size
        if isinstance(size, Sequence) and None in size:
            raise LoweringError(f"QuantAdaptiveAvgPool2d needs a fixed output size, got {size}")
        m = cls(size, backend=backend)  # type: ignore[arg-type]
        m.set_qparams("input", input_scale, input_zero_point)
        m.set_qparams("output", output_scale, output_zero_point)
        return m

    def config(self) -> dict[str, Any]:
        return {"output_size": list(self.output_size), "backend": self.backend, "arithmetic": self.arithmetic}

    def onnxruntime_problem(self) -> str | None:
        """Why this pool cannot compute onnxruntime's arithmetic, or None (a global pool)."""
        if tuple(self.output_size) != (1, 1):
            return (f"output size {tuple(self.output_size)}: onnxruntime's quantized pool arithmetic is "
                    f"reproduced for global pooling (QLinearGlobalAveragePool) only")
        return None

    def _window(self, shape: Sequence[int]) -> tuple[int, int] | None:
        (oh, ow), (h, w) = self.output_size, shape[2:]
        return (h // oh, w // ow) if h % oh == 0 and w % ow == 0 else None

    def kernel_support(self, input_shape: Sequence[int]) -> Support:
        """Whether the depthwise-conv kernel runs for this ``(N, C, H, W)`` input, or why not."""
        if self.backend == "reference":
            return _REFERENCE_ONLY
        window = self._window(input_shape)
        if window is None:
            return Support(False, f"input {tuple(input_shape[2:])} does not split into equal windows "
                                  f"for output {self.output_size}")
        return supports_qconv((input_shape[1], 1, *window), input_shape, stride=window,
                              padding=(0, 0), dilation=(1, 1), groups=input_shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_uint8_4d(x, "QuantAdaptiveAvgPool2d")
        op = "adaptive_avg_pool2d_onnxruntime" if self.arithmetic == "onnxruntime" else "adaptive_avg_pool2d"
        return run_op(op, x, self.input_scale, self.input_zero_point, self.output_scale,
                      self.output_zero_point, self.output_size, self.use_kernels)

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, bits=8, in=({summarize(self.input_scale)}, "
                f"{int(self.input_zero_point)}), out=({summarize(self.output_scale)}, "
                f"{int(self.output_zero_point)}), backend={self.backend}"
                + (f", arithmetic={self.arithmetic}" if self.arithmetic != "onednn" else ""))
