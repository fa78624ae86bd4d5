"""Lowered integer modules: what the ``lower`` pass puts in the graph.

Every module here holds plain tensors only as state and a rebuildable kernel cache (see
:mod:`fxcompress.quant.lowered_base`), has a ``from_float`` constructor, a ``config()``
that rebuilds it, and a ``repr`` showing bits, scales and backend. ``backend="x86"``
runs the oneDNN/aten kernels wherever their preconditions hold (checked per input
shape, before any call) and the reference path elsewhere; ``kernel_support`` says which
and why. ``backend="reference"`` runs the same arithmetic with portable torch ops.

Static int8 activations stay uint8 channels-last between ops: :class:`QuantConv2d`
requantizes inside the kernel, so consecutive int8 ops never round-trip through float.
This module defines the (de)quantization modules and the static linear; it re-exports the
static convs (:mod:`.lowered_conv`), the dynamic/weight-only linears, the weight-only conv
(a conv kept float, stored as int8 codes), the uint8 pools, the uint8 add and product and the uint8 activation table so that callers
import everything from here. Each class registers its MACs
counter in its own file (its artifact codec is registered by :class:`LoweredModule`).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from fxcompress import macs
from fxcompress.errors import ConfigError, InputError, LoweringError
from fxcompress.quant.kernels import LINEAR_POST_OPS, POST_OPS, Support, int8_weight_support, supports_qlinear
from fxcompress.quant.lowered_base import LoweredModule, check_arithmetic, check_post_op, run_op, summarize
from fxcompress.quant.lowered_conv import QuantConv1d, QuantConv2d, QuantConv3d, QuantConvNd
from fxcompress.quant.lowered_linear import DynamicQuantLinear, WeightOnlyLinear
from fxcompress.quant.lowered_add import QuantAdd
from fxcompress.quant.lowered_pool import QuantAdaptiveAvgPool2d, QuantMaxPool2d
from fxcompress.quant.lowered_mul import QuantMul
from fxcompress.quant.lowered_table import QuantTable
from fxcompress.quant.lowered_weight_only_conv import WeightOnlyConv

__all__ = [
    "LoweredModule",
    "Quantize",
    "QuantizeProduct",
    "Dequantize",
    "QuantConvNd",
    "QuantConv1d",
    "QuantConv2d",
    "QuantConv3d",
    "QuantLinear",
    "DynamicQuantLinear",
    "WeightOnlyLinear",
    "WeightOnlyConv",
    "QuantMaxPool2d",
    "QuantAdaptiveAvgPool2d",
    "QuantAdd",
    "QuantTable",
    "QuantMul",
]

_REFERENCE_ONLY = Support(False, "backend='reference' was requested")


def _check_uint8(x: torch.Tensor, where: str) -> None:
    if x.dtype != torch.uint8:
        raise InputError(f"{where} expects a uint8 activation (quantized upstream), got {x.dtype}; "
                         f"put a Quantize module in front of it")


class Quantize(LoweredModule):
    """Float -> uint8 affine per tensor; keeps the memory format.

    With ``activation`` (a post-op name: ``swish``, ``hardswish``, ``gelu``, ...) it
    quantizes ``activation(x)``, computed with torch's op chunk by chunk inside the
    quantization loop (one pass over memory instead of two): how the lowering runs an
    activation oneDNN would approximate differently, between a float32-output kernel
    and the quantization that follows it.

    With ``guard`` (the name of the graph input it reads; the lowering sets it) it refuses
    non-finite values with an :class:`~fxcompress.errors.InputError`: integer codes cannot
    represent NaN or Inf (NaN would land on a code, Inf saturate), so a model that quietly
    returned plausible outputs for a NaN input would hide the fault the float model shows.
    The check is one sum over the input (NaN and Inf propagate through it; a finite input
    whose sum overflows float32 is refused too), about a tenth of the quantization's cost.
    """

    def __init__(self, *, activation: str = "none", activation_args: Sequence[float] = (),
                 guard: str = "", backend: str = "x86", arithmetic: str = "onednn") -> None:
        super().__init__(backend)
        self.activation = activation
        self.activation_args = check_post_op(activation, activation_args, POST_OPS)
        self.guard = str(guard)
        self.arithmetic = check_arithmetic(arithmetic)
        self.register_qparams("output")

    @classmethod
    def from_qparams(cls, scale: float | torch.Tensor, zero_point: int | torch.Tensor, *,
                     activation: str = "none", activation_args: Sequence[float] = (), guard: str = "",
                     backend: str = "x86", arithmetic: str = "onednn") -> Quantize:
        m = cls(activation=activation, activation_args=activation_args, guard=guard, backend=backend,
                arithmetic=arithmetic)
        m.set_qparams("output", scale, zero_point)
        return m

    def config(self) -> dict[str, Any]:
        return {"activation": self.activation, "activation_args": list(self.activation_args),
                "guard": self.guard, "backend": self.backend, "arithmetic": self.arithmetic}

    def onnxruntime_problem(self) -> str | None:
        """Why this quantize cannot round as ONNX ``QuantizeLinear`` does: never."""
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The NaN/Inf guard runs inside the operator: compiled and exported programs keep it.
        # arithmetic="onnxruntime" divides by the scale, as QuantizeLinear does.
        op = "quantize_onnxruntime" if self.arithmetic == "onnxruntime" else "quantize"
        return run_op(op, x, self.output_scale, self.output_zero_point, self.activation, self.activation_args,
                      self.guard)

    def extra_repr(self) -> str:
        act = f"activation={self.activation}, " if self.activation != "none" else ""
        guard = f"guard={self.guard!r}, " if self.guard else ""
        return (f"{act}{guard}bits=8, scale={summarize(self.output_scale)}, zp={int(self.output_zero_point)}, "
                f"backend={self.backend}" + (f", arithmetic={self.arithmetic}" if self.arithmetic != "onednn" else ""))


class QuantizeProduct(LoweredModule):
    """``x * gains`` -> uint8 affine per tensor, for a channels-last ``(N, C, H, W)`` ``x``
    and ``(N, C, 1, 1)`` gains (squeeze-excitation), without the float product in memory
    (:func:`~fxcompress.quant.uint8.quantize_product_uint8`); bit for bit a float
    multiply followed by :class:`Quantize` (with ``arithmetic="onnxruntime"``, by a
    ``QuantizeLinear``: the product divided by the scale)."""

    def __init__(self, *, backend: str = "x86", arithmetic: str = "onednn") -> None:
        super().__init__(backend)
        self.arithmetic = check_arithmetic(arithmetic)
        self.register_qparams("output")

    @classmethod
    def from_qparams(cls, scale: float | torch.Tensor, zero_point: int | torch.Tensor, *,
                     backend: str = "x86", arithmetic: str = "onednn") -> QuantizeProduct:
        m = cls(backend=backend, arithmetic=arithmetic)
        m.set_qparams("output", scale, zero_point)
        return m

    def config(self) -> dict[str, Any]:
        return {"backend": self.backend, "arithmetic": self.arithmetic}

    def onnxruntime_problem(self) -> str | None:
        """Why this quantize cannot round as ONNX ``QuantizeLinear`` does: never."""
        return None

    def forward(self, x: torch.Tensor, gains: torch.Tensor) -> torch.Tensor:
        op = "quantize_product_onnxruntime" if self.arithmetic == "onnxruntime" else "quantize_product"
        return run_op(op, x, gains, self.output_scale, self.output_zero_point)

    def extra_repr(self) -> str:
        return (f"bits=8, scale={summarize(self.output_scale)}, zp={int(self.output_zero_point)}, "
                f"backend={self.backend}" + (f", arithmetic={self.arithmetic}" if self.arithmetic != "onednn" else ""))


class Dequantize(LoweredModule):
    """uint8 -> float32 affine per tensor (graph outputs)."""

    def __init__(self, *, backend: str = "x86") -> None:
        super().__init__(backend)
        self.register_qparams("input")

    @classmethod
    def from_qparams(cls, scale: float | torch.Tensor, zero_point: int | torch.Tensor,
                     *, backend: str = "x86") -> Dequantize:
        m = cls(backend=backend)
        m.set_qparams("input", scale, zero_point)
        return m

    def config(self) -> dict[str, Any]:
        return {"backend": self.backend}

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        _check_uint8(q, "Dequantize")
        return run_op("dequantize", q, self.input_scale, self.input_zero_point)

    def extra_repr(self) -> str:
        return (f"bits=8, scale={summarize(self.input_scale)}, zp={int(self.input_zero_point)}, "
                f"backend={self.backend}")


class QuantLinear(LoweredModule):
    """Static int8 linear: uint8 in (any rank >= 2), int8 per-channel weight, uint8 or float32 out."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 post_op: str = "none", post_op_args: Sequence[float] = (),
                 output: str = "uint8", backend: str = "x86") -> None:
        super().__init__(backend)
        if output not in ("uint8", "float32"):
            raise ConfigError(f"output must be 'uint8' or 'float32', got {output!r}")
        self.in_features, self.out_features, self.output = in_features, out_features, output
        self.post_op = post_op
        self.post_op_args = check_post_op(post_op, post_op_args, LINEAR_POST_OPS)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.register_qparams("input")
        if output == "uint8":
            self.register_qparams("output")

    @classmethod
    def from_float(cls, linear: nn.Linear, weight_scale: torch.Tensor,
                   input_scale: float | torch.Tensor, input_zero_point: int | torch.Tensor,
                   output_scale: float | torch.Tensor | None = None,
                   output_zero_point: int | torch.Tensor = 0, *, post_op: str = "none",
                   post_op_args: Sequence[float] = (), backend: str = "x86") -> QuantLinear:
        """Quantize a float ``nn.Linear``; ``output_scale=None`` gives a float32 output."""
        if not isinstance(linear, nn.Linear):
            raise LoweringError(f"QuantLinear.from_float needs an nn.Linear, got {type(linear).__name__}")
        output = "float32" if output_scale is None else "uint8"
        m = cls(linear.in_features, linear.out_features, linear.bias is not None,
                post_op=post_op, post_op_args=post_op_args, output=output, backend=backend)
        m.load_float_layer(linear, weight_scale, (input_scale, input_zero_point),
                           None if output_scale is None else (output_scale, output_zero_point))
        return m

    def config(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "post_op": self.post_op,
                "post_op_args": list(self.post_op_args), "output": self.output,
                "backend": self.backend}

    def kernel_support(self) -> Support:
        """Whether the oneDNN kernel runs (it takes any input shape), or why not."""
        if self.backend == "reference":
            return _REFERENCE_ONLY
        return supports_qlinear(self.in_features, self.post_op) and int8_weight_support(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_uint8(x, "QuantLinear")
        if x.shape[-1] != self.in_features:
            raise InputError(f"QuantLinear expects {self.in_features} input features, got {x.shape[-1]}")
        uint8_out = self.output == "uint8"
        return run_op("qlinear", x, self.weight, self.weight_scale, self.bias, self.input_scale,
                      self.input_zero_point, self.output_scale if uint8_out else None,
                      self.output_zero_point if uint8_out else None, self.post_op, self.post_op_args,
                      self.use_kernels)

    def extra_repr(self) -> str:
        out = (f"out=({summarize(self.output_scale)}, {int(self.output_zero_point)})"
               if self.output == "uint8" else "out=float32")
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"post_op={self.post_op}, bits=8, w_scale={summarize(self.weight_scale)}, "
                f"in=({summarize(self.input_scale)}, {int(self.input_zero_point)}), {out}, "
                f"backend={self.backend}")


def _count_linear_macs(gm: torch.fx.GraphModule, node: torch.fx.Node) -> dict[str, int]:
    return macs.count_linear(gm, node, gm.get_submodule(str(node.target)).in_features)


macs.register_module(QuantLinear, _count_linear_macs)
