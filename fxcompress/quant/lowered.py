"""Lowered integer modules: what the ``lower`` pass puts in the graph.

Every module here holds plain tensors only as state and a rebuildable kernel cache (see
:mod:`fxcompress.quant.lowered_base`), has a ``from_float`` constructor, a ``config()``
that rebuilds it, and a ``repr`` showing bits, scales and backend. ``backend="x86"``
runs the oneDNN/aten kernels wherever their preconditions hold (checked per input
shape, before any call) and the reference path elsewhere; ``kernel_support`` says which
and why. ``backend="reference"`` runs the same arithmetic with portable torch ops.

Static int8 activations stay uint8 channels-last between ops: :class:`QuantConv2d`
requantizes inside the kernel, so consecutive int8 ops never round-trip through float.
This module defines the static ones; it re-exports the dynamic/weight-only linears and
the uint8 pooling/add modules so that callers import everything from here.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fxcompress import macs
from fxcompress.errors import ConfigError, InputError, LoweringError
from fxcompress.quant.int_math import accumulate, add_dequantized, rescale
from fxcompress.quant.kernels import (
    CONV_POST_OPS, LINEAR_POST_OPS, POST_OPS, QConvKernel, QLinearKernel, Support, int8_weight_support,
    supports_qconv, supports_qlinear,
)
from fxcompress.quant.lowered_base import LoweredModule, as_pair, summarize
from fxcompress.quant.lowered_linear import DynamicQuantLinear, WeightOnlyLinear
from fxcompress.quant.lowered_pool import QuantAdaptiveAvgPool2d, QuantAdd, QuantMaxPool2d
from fxcompress.quant.uint8 import (
    apply_post_op, dequantize_uint8, quantize_product_uint8, quantize_uint8, requantize_uint8,
)

__all__ = [
    "LoweredModule",
    "Quantize",
    "QuantizeProduct",
    "Dequantize",
    "QuantConv2d",
    "QuantLinear",
    "DynamicQuantLinear",
    "WeightOnlyLinear",
    "QuantMaxPool2d",
    "QuantAdaptiveAvgPool2d",
    "QuantAdd",
]

_REFERENCE_ONLY = Support(False, "backend='reference' was requested")


def _quantize_weight(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 per output channel (dim 0); oneDNN ignores weight zero points."""
    scale = torch.as_tensor(scale, dtype=torch.float32).detach().flatten()
    if scale.numel() != w.shape[0] or not bool((scale > 0).all() and scale.isfinite().all()):
        raise LoweringError(f"weight_scale must hold {w.shape[0]} positive finite values "
                            f"(one per output channel), got shape {tuple(scale.shape)}")
    q = torch.round(w.detach().float() / scale.view(-1, *([1] * (w.dim() - 1))))
    return q.clamp_(-128, 127).to(torch.int8), scale


def _check_post_op(post_op: str, args: Sequence[float], table: dict[str, int]) -> tuple[float, ...]:
    if post_op not in table:
        raise ConfigError(f"post_op must be one of {', '.join(table)}; got {post_op!r}")
    if len(args) != table[post_op]:
        raise ConfigError(f"post_op {post_op!r} takes {table[post_op]} arguments, got {tuple(args)}")
    return tuple(float(a) for a in args)


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
    """

    def __init__(self, *, activation: str = "none", activation_args: Sequence[float] = (),
                 backend: str = "x86") -> None:
        super().__init__(backend)
        self.activation = activation
        self.activation_args = _check_post_op(activation, activation_args, POST_OPS)
        self.register_qparams("output")

    @classmethod
    def from_qparams(cls, scale: float | torch.Tensor, zero_point: int | torch.Tensor, *,
                     activation: str = "none", activation_args: Sequence[float] = (),
                     backend: str = "x86") -> Quantize:
        m = cls(activation=activation, activation_args=activation_args, backend=backend)
        m.set_qparams("output", scale, zero_point)
        return m

    def config(self) -> dict[str, Any]:
        return {"activation": self.activation, "activation_args": list(self.activation_args),
                "backend": self.backend}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._cache is None:
            self._cache = {"q": self.qparams("output")}
        return quantize_uint8(x, *self._cache["q"], self.activation, self.activation_args)

    def extra_repr(self) -> str:
        act = f"activation={self.activation}, " if self.activation != "none" else ""
        return (f"{act}bits=8, scale={summarize(self.output_scale)}, zp={int(self.output_zero_point)}, "
                f"backend={self.backend}")


class QuantizeProduct(LoweredModule):
    """``x * gains`` -> uint8 affine per tensor, for a channels-last ``(N, C, H, W)`` ``x``
    and ``(N, C, 1, 1)`` gains (squeeze-excitation), without the float product in memory
    (:func:`~fxcompress.quant.uint8.quantize_product_uint8`); bit for bit a float
    multiply followed by :class:`Quantize`."""

    def __init__(self, *, backend: str = "x86") -> None:
        super().__init__(backend)
        self.register_qparams("output")

    @classmethod
    def from_qparams(cls, scale: float | torch.Tensor, zero_point: int | torch.Tensor, *,
                     backend: str = "x86") -> QuantizeProduct:
        m = cls(backend=backend)
        m.set_qparams("output", scale, zero_point)
        return m

    def config(self) -> dict[str, Any]:
        return {"backend": self.backend}

    def forward(self, x: torch.Tensor, gains: torch.Tensor) -> torch.Tensor:
        if self._cache is None:
            self._cache = {"q": self.qparams("output")}
        return quantize_product_uint8(x, gains, *self._cache["q"])

    def extra_repr(self) -> str:
        return (f"bits=8, scale={summarize(self.output_scale)}, zp={int(self.output_zero_point)}, "
                f"backend={self.backend}")


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
        if self._cache is None:
            self._cache = {"q": self.qparams("input")}
        return dequantize_uint8(q, *self._cache["q"])

    def extra_repr(self) -> str:
        return (f"bits=8, scale={summarize(self.input_scale)}, zp={int(self.input_zero_point)}, "
                f"backend={self.backend}")


class QuantConv2d(LoweredModule):
    """Static int8 2-D conv: uint8 in, int8 symmetric per-channel weight, uint8 or float32 out.

    Computes ``requant(post_op(conv(deq(x), deq(w)) + b [+ deq(residual)]))``. With
    ``residual`` the residual add is fused (oneDNN ``sum``, ``post_op`` none/relu):
    ``forward(x, residual)``. The kernel writes into the residual tensor; unless
    ``consume_residual`` is set (the caller guarantees nothing reads the residual
    afterwards) the module copies it first. Outputs are channels-last.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int],
                 stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
                 dilation: int | Sequence[int] = 1, groups: int = 1, bias: bool = True, *,
                 post_op: str = "none", post_op_args: Sequence[float] = (), output: str = "uint8",
                 residual: bool = False, consume_residual: bool = False,
                 backend: str = "x86") -> None:
        super().__init__(backend)
        if in_channels % groups or out_channels % groups:
            raise ConfigError(f"channels {in_channels}->{out_channels} are not divisible by groups={groups}")
        if output not in ("uint8", "float32"):
            raise ConfigError(f"output must be 'uint8' or 'float32', got {output!r}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = as_pair(kernel_size, "kernel_size")
        self.stride, self.padding = as_pair(stride, "stride"), as_pair(padding, "padding")
        self.dilation = as_pair(dilation, "dilation")
        self.post_op = post_op
        self.post_op_args = _check_post_op(post_op, post_op_args, CONV_POST_OPS)
        if residual and post_op not in ("none", "relu"):
            raise ConfigError(f"a fused residual add combines only with post_op none/relu, got {post_op!r}")
        self.output, self.residual, self.consume_residual = output, residual, consume_residual
        self.register_buffer("weight", torch.zeros(out_channels, in_channels // groups,
                                                   *self.kernel_size, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_channels))
        self.register_buffer("bias", torch.zeros(out_channels) if bias else None)
        self.register_qparams("input")
        if output == "uint8":
            self.register_qparams("output")
            if residual:
                self.register_qparams("residual")

    @classmethod
    def from_float(cls, conv: nn.Conv2d, weight_scale: torch.Tensor,
                   input_scale: float | torch.Tensor, input_zero_point: int | torch.Tensor,
                   output_scale: float | torch.Tensor | None = None,
                   output_zero_point: int | torch.Tensor = 0, *, post_op: str = "none",
                   post_op_args: Sequence[float] = (), residual: bool = False,
                   residual_scale: float | torch.Tensor | None = None,
                   residual_zero_point: int | torch.Tensor = 0, consume_residual: bool = False,
                   backend: str = "x86") -> QuantConv2d:
        """Quantize a float ``nn.Conv2d`` (weights by ``weight_scale``, one per out channel).

        ``output_scale=None`` gives a float32 output (and a float32 residual); otherwise
        uint8, and a residual needs ``residual_scale``/``residual_zero_point``.
        """
        if not isinstance(conv, nn.Conv2d) or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise LoweringError(f"QuantConv2d.from_float needs an nn.Conv2d with numeric zero padding, "
                                f"got {conv!r}")
        output = "float32" if output_scale is None else "uint8"
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                conv.dilation, conv.groups, conv.bias is not None, post_op=post_op,
                post_op_args=post_op_args, output=output, residual=residual,
                consume_residual=consume_residual, backend=backend)
        q, scale = _quantize_weight(conv.weight, weight_scale)
        m.weight.copy_(q)
        m.weight_scale.copy_(scale)
        if conv.bias is not None:
            m.bias.copy_(conv.bias.detach())
        m.set_qparams("input", input_scale, input_zero_point)
        if output == "uint8":
            m.set_qparams("output", output_scale, output_zero_point)
            if residual:
                if residual_scale is None:
                    raise LoweringError("a uint8 QuantConv2d with a residual needs residual_scale")
                m.set_qparams("residual", residual_scale, residual_zero_point)
        return m

    @property
    def mutates_args(self) -> tuple[int, ...]:
        """Node argument indices this module may write into (read by the verifier and by
        dead-node elimination): the residual, when it is consumed in place."""
        return (1,) if self.residual and self.consume_residual else ()

    def config(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": list(self.padding), "dilation": list(self.dilation),
                "groups": self.groups, "bias": self.bias is not None, "post_op": self.post_op,
                "post_op_args": list(self.post_op_args), "output": self.output,
                "residual": self.residual, "consume_residual": self.consume_residual,
                "backend": self.backend}

    def kernel_support(self, input_shape: Sequence[int]) -> Support:
        """Whether an ``(N, C, H, W)`` input runs the oneDNN kernel, or why not."""
        if self.backend == "reference":
            return _REFERENCE_ONLY
        geometry = supports_qconv(self.weight.shape, input_shape, stride=self.stride,
                                  padding=self.padding, dilation=self.dilation, groups=self.groups,
                                  post_op=self.post_op, residual=self.residual)
        return geometry and int8_weight_support(self.weight)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        _check_uint8(x, "QuantConv2d")
        if residual is not None and not self.residual:
            raise InputError("this QuantConv2d has no fused residual; build it with residual=True")
        cache = self._cache if self._cache is not None else self._init_cache()
        run = cache.get(x.shape[1:])
        if run is None:
            run = self._select(cache, x.shape)
        return run(x, residual)

    def _init_cache(self) -> dict[Any, Any]:
        out = self.qparams("output") if self.output == "uint8" else (None, 0)
        res = self.qparams("residual") if self.output == "uint8" and self.residual else (None, 0)
        self._cache = {"in": self.qparams("input"), "out": out, "res": res}
        return self._cache

    def _select(self, cache: dict[Any, Any], shape: torch.Size) -> Callable[..., torch.Tensor]:
        (xs, xzp), (os_, ozp), (rs, rzp) = cache["in"], cache["out"], cache["res"]
        run: Callable[..., torch.Tensor]
        if self.kernel_support(shape):
            kernel = QConvKernel(
                self.weight, self.weight_scale, self.bias, input_shape=shape, input_scale=xs,
                input_zero_point=xzp, stride=self.stride, padding=self.padding,
                dilation=self.dilation, groups=self.groups, post_op=self.post_op,
                post_op_args=self.post_op_args, output_scale=os_, output_zero_point=ozp,
                residual_scale=(rs if os_ is not None else 1.0) if self.residual else None,
                residual_zero_point=rzp)
            run = self._fused_add(kernel) if self.residual else (lambda x, r: kernel(x))
        else:
            run = self._reference
        return self.remember(cache, shape[1:], run)

    def _fused_add(self, kernel: QConvKernel) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
        dtype = torch.uint8 if self.output == "uint8" else torch.float32
        out_chw = torch.Size(self._out_chw((0, *kernel.input_chw)))

        def run(x: torch.Tensor, r: torch.Tensor | None) -> torch.Tensor:
            r = self._check_residual(x, r, dtype, out_chw)
            if not (self.consume_residual and r.is_contiguous(memory_format=torch.channels_last)):
                r = r.clone(memory_format=torch.channels_last)  # the kernel writes into it
            return kernel.add_(x, r)
        return run

    def _out_chw(self, shape: Sequence[int]) -> tuple[int, int, int]:
        return (self.out_channels, *(
            (shape[2 + i] + 2 * self.padding[i] - self.dilation[i] * (self.kernel_size[i] - 1) - 1)
            // self.stride[i] + 1 for i in range(2)))

    @staticmethod
    def _check_residual(x: torch.Tensor, r: torch.Tensor | None, dtype: torch.dtype,
                        out_chw: tuple[int, int, int]) -> torch.Tensor:
        if r is None:
            raise InputError("QuantConv2d(residual=True) needs forward(x, residual)")
        if r.dtype != dtype or r.shape[1:] != out_chw or r.shape[0] != x.shape[0]:
            raise InputError(f"QuantConv2d residual must be {dtype} of shape "
                             f"{(x.shape[0], *out_chw)}, got {r.dtype} {tuple(r.shape)}")
        return r

    def _reference(self, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """The kernel's arithmetic with portable ops, bit for bit (:mod:`..int_math`)."""
        cache = self._cache if self._cache is not None else self._init_cache()
        (xs, xzp), (os_, ozp), (rs, rzp) = cache["in"], cache["out"], cache["res"]
        acc = accumulate(lambda a, w: F.conv2d(a, w, None, self.stride, self.padding, self.dilation, self.groups),
                         x.to(torch.int16) - xzp, self.weight)
        y = rescale(acc, xs, self.weight_scale, self.bias, 1)
        if self.residual:
            dtype = torch.uint8 if self.output == "uint8" else torch.float32
            r = self._check_residual(x, residual, dtype, torch.Size(self._out_chw(x.shape)))
            y = add_dequantized(y, r, rs, rzp) if rs is not None else y + r
        y = apply_post_op(y, self.post_op, self.post_op_args).contiguous(memory_format=torch.channels_last)
        return requantize_uint8(y, os_, ozp)

    def extra_repr(self) -> str:
        out = (f"out=({summarize(self.output_scale)}, {int(self.output_zero_point)})"
               if self.output == "uint8" else "out=float32")
        extra = f", residual{'(consumed)' if self.consume_residual else ''}" if self.residual else ""
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"groups={self.groups}, post_op={self.post_op}{extra}, bits=8, "
                f"w_scale={summarize(self.weight_scale)}, in=({summarize(self.input_scale)}, "
                f"{int(self.input_zero_point)}), {out}, backend={self.backend}")


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
        self.post_op_args = _check_post_op(post_op, post_op_args, LINEAR_POST_OPS)
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
        q, scale = _quantize_weight(linear.weight, weight_scale)
        m.weight.copy_(q)
        m.weight_scale.copy_(scale)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach())
        m.set_qparams("input", input_scale, input_zero_point)
        if output == "uint8":
            m.set_qparams("output", output_scale, output_zero_point)
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
        cache = self._cache if self._cache is not None else self._init_cache()
        return cache["run"](x)

    def _init_cache(self) -> dict[Any, Any]:
        xs, xzp = self.qparams("input")
        os_, ozp = self.qparams("output") if self.output == "uint8" else (None, 0)
        cache: dict[Any, Any] = {}
        if self.kernel_support():
            kernel = QLinearKernel(self.weight, self.weight_scale, self.bias, post_op=self.post_op,
                                   post_op_args=self.post_op_args, output_scale=os_,
                                   output_zero_point=ozp)
            cache["run"] = lambda x: kernel(x, xs, xzp)
        else:  # the kernel's arithmetic with portable ops, bit for bit (int_math)
            cache["run"] = lambda x: requantize_uint8(apply_post_op(
                rescale(accumulate(F.linear, x.to(torch.int16) - xzp, self.weight), xs, self.weight_scale,
                        self.bias, -1), self.post_op, self.post_op_args), os_, ozp)
        self._cache = cache
        return cache

    def extra_repr(self) -> str:
        out = (f"out=({summarize(self.output_scale)}, {int(self.output_zero_point)})"
               if self.output == "uint8" else "out=float32")
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"post_op={self.post_op}, bits=8, w_scale={summarize(self.weight_scale)}, "
                f"in=({summarize(self.input_scale)}, {int(self.input_zero_point)}), {out}, "
                f"backend={self.backend}")


def _count_conv_macs(gm: torch.fx.GraphModule, node: torch.fx.Node) -> dict[str, int]:
    return macs.count_conv(gm, node, gm.get_submodule(str(node.target)).weight.shape)


def _count_linear_macs(gm: torch.fx.GraphModule, node: torch.fx.Node) -> dict[str, int]:
    return macs.count_linear(gm, node, gm.get_submodule(str(node.target)).in_features)


macs.register_module(QuantConv2d, _count_conv_macs)
macs.register_module(QuantLinear, _count_linear_macs)
macs.register_module(DynamicQuantLinear, _count_linear_macs)
macs.register_module(WeightOnlyLinear, _count_linear_macs)
