"""Static int8 convolutions: :class:`QuantConv1d`, :class:`QuantConv2d`, :class:`QuantConv3d`.

uint8 activations in, int8 symmetric per-output-channel weights, uint8 (requantized inside
the kernel) or float32 out. Any padding a torch conv takes is supported: symmetric numeric
zero padding goes to the kernel; ``padding="same"`` with an even kernel (asymmetric) and
the ``reflect`` / ``replicate`` / ``circular`` padding modes pad the uint8 *codes* first
(zero padding pads with the input's zero point, the code of 0.0; the other modes copy
codes, hence values), exactly as the float conv pads its input. 2-D convs can fuse a
residual add (oneDNN's ``sum``). Outputs are channels-last (2-D, 3-D) or oneDNN's
``(N, L, C)``-strided layout (1-D).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

import fxcompress.oplib
from fxcompress import macs
from fxcompress.errors import ConfigError, InputError, LoweringError
from fxcompress.quant.kernels import CONV_POST_OPS, CONV_POST_OPS_BY_DIMS, Support, int8_weight_support, supports_qconv
from fxcompress.quant.eager_plan import EagerPlan, may_plan
from fxcompress.oplib.arith_onnxruntime import CLAMP_POST_OPS, bias_codes
from fxcompress.quant.lowered_base import LoweredModule, check_arithmetic, run_op, summarize

__all__ = ["PADDING_MODES", "QuantConvNd", "QuantConv1d", "QuantConv2d", "QuantConv3d", "conv_padding"]

#: How a conv pads its input (``nn.Conv*d.padding_mode``).
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
_REFERENCE_ONLY = Support(False, "backend='reference' was requested")


def _as_tuple(value: int | Sequence[int], dims: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * dims
    out = tuple(int(v) for v in value)
    if len(out) != dims:
        raise ConfigError(f"{name} must be an int or {dims} ints, got {value!r}")
    return out


def conv_padding(conv: nn.modules.conv._ConvNd) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(padding, pre_padding)`` computing what ``conv`` pads: symmetric numeric zero padding
    for the kernel, and a ``F.pad`` spec (last dim first) applied to the input before it.

    Symmetric zero padding needs no ``pre_padding``; ``padding="same"`` with an even kernel
    and the non-zero padding modes put everything in ``pre_padding`` (as torch does).
    """
    dims = len(conv.kernel_size)
    if conv.padding == "valid":
        pairs = [(0, 0)] * dims
    elif conv.padding == "same":
        pairs = []
        for d, k in zip(conv.dilation, conv.kernel_size):
            total = d * (k - 1)
            pairs.append((total // 2, total - total // 2))
    else:
        pairs = [(p, p) for p in _as_tuple(conv.padding, dims, "padding")]  # type: ignore[arg-type]
    if conv.padding_mode == "zeros" and all(a == b for a, b in pairs):
        return tuple(a for a, _ in pairs), ()
    pre = tuple(v for pair in reversed(pairs) for v in pair)
    return (0,) * dims, pre


class QuantConvNd(LoweredModule):
    """Static int8 N-D conv (see the module docstring); subclasses fix ``spatial_dims``.

    Computes ``requant(post_op(conv(pad(deq(x)), deq(w)) + b [+ deq(residual)]))``. With
    ``residual`` (2-D only) the residual add is fused (oneDNN ``sum``, ``post_op``
    none/relu): ``forward(x, residual)``. The kernel writes into the residual tensor; unless
    ``consume_residual`` is set (the caller guarantees nothing reads the residual afterwards)
    the module copies it first.

    ``arithmetic="onnxruntime"`` (uint8 output, no residual, post-op none / relu / hardtanh)
    requantizes as onnxruntime's ``QLinearConv`` does: the int32 bias on the accumulator
    grid, one float32 multiplier per channel, the post-op as a clamp of the codes
    (:mod:`fxcompress.oplib.arith_onnxruntime`); its QDQ export runs bit for bit there.
    """

    spatial_dims: int = 2

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int],
                 stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
                 dilation: int | Sequence[int] = 1, groups: int = 1, bias: bool = True, *,
                 padding_mode: str = "zeros", pre_padding: Sequence[int] = (),
                 post_op: str = "none", post_op_args: Sequence[float] = (), output: str = "uint8",
                 residual: bool = False, consume_residual: bool = False,
                 backend: str = "x86", arithmetic: str = "onednn") -> None:
        super().__init__(backend)
        dims = self.spatial_dims
        if in_channels % groups or out_channels % groups:
            raise ConfigError(f"channels {in_channels}->{out_channels} are not divisible by groups={groups}")
        if output not in ("uint8", "float32"):
            raise ConfigError(f"output must be 'uint8' or 'float32', got {output!r}")
        if padding_mode not in PADDING_MODES:
            raise ConfigError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        if len(pre_padding) not in (0, 2 * dims) or any(int(p) < 0 for p in pre_padding):
            raise ConfigError(f"pre_padding must be empty or {2 * dims} non-negative ints, got {tuple(pre_padding)}")
        if padding_mode != "zeros" and not pre_padding and padding != 0:
            raise ConfigError(f"padding_mode {padding_mode!r} pads through pre_padding; numeric padding must be 0")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = _as_tuple(kernel_size, dims, "kernel_size")
        self.stride, self.padding = _as_tuple(stride, dims, "stride"), _as_tuple(padding, dims, "padding")
        self.dilation = _as_tuple(dilation, dims, "dilation")
        self.padding_mode, self.pre_padding = padding_mode, tuple(int(p) for p in pre_padding)
        self.post_op = post_op
        self.post_op_args = _check_post_op(post_op, post_op_args, dims)
        if residual and dims != 2:
            raise ConfigError("a fused residual add exists for 2-D convs only")
        if residual and post_op not in ("none", "relu"):
            raise ConfigError(f"a fused residual add combines only with post_op none/relu, got {post_op!r}")
        self.output, self.residual, self.consume_residual = output, residual, consume_residual
        self.arithmetic = check_arithmetic(arithmetic, self.onnxruntime_problem())
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
    def from_float(cls, conv: nn.modules.conv._ConvNd, weight_scale: torch.Tensor,
                   input_scale: float | torch.Tensor, input_zero_point: int | torch.Tensor,
                   output_scale: float | torch.Tensor | None = None,
                   output_zero_point: int | torch.Tensor = 0, *, post_op: str = "none",
                   post_op_args: Sequence[float] = (), residual: bool = False,
                   residual_scale: float | torch.Tensor | None = None,
                   residual_zero_point: int | torch.Tensor = 0, consume_residual: bool = False,
                   backend: str = "x86", arithmetic: str = "onednn") -> QuantConvNd:
        """Quantize a float conv of this dimensionality (weights by ``weight_scale``, one per
        output channel), with whatever padding it has.

        ``output_scale=None`` gives a float32 output (and a float32 residual); otherwise
        uint8, and a residual needs ``residual_scale``/``residual_zero_point``.
        """
        torch_cls = getattr(nn, f"Conv{cls.spatial_dims}d")
        if not isinstance(conv, torch_cls) or isinstance(conv, nn.modules.conv._ConvTransposeNd):
            raise LoweringError(f"{cls.__name__}.from_float needs an nn.{torch_cls.__name__}, got {conv!r}")
        padding, pre_padding = conv_padding(conv)
        output = "float32" if output_scale is None else "uint8"
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, padding,
                conv.dilation, conv.groups, conv.bias is not None, padding_mode=conv.padding_mode,
                pre_padding=pre_padding, post_op=post_op, post_op_args=post_op_args, output=output,
                residual=residual, consume_residual=consume_residual, backend=backend, arithmetic=arithmetic)
        m.load_float_layer(conv, weight_scale, (input_scale, input_zero_point),
                           None if output_scale is None else (output_scale, output_zero_point))
        if m.arithmetic == "onnxruntime" and m.bias is not None:
            bias_codes(m.bias, m.input_scale, m.weight_scale)  # an int32 bias that cannot hold it raises now
        if output == "uint8" and residual:
            if residual_scale is None:
                raise LoweringError(f"a uint8 {cls.__name__} with a residual needs residual_scale")
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
                "groups": self.groups, "bias": self.bias is not None, "padding_mode": self.padding_mode,
                "pre_padding": list(self.pre_padding), "post_op": self.post_op,
                "post_op_args": list(self.post_op_args), "output": self.output,
                "residual": self.residual, "consume_residual": self.consume_residual,
                "backend": self.backend, "arithmetic": self.arithmetic}

    def onnxruntime_problem(self) -> str | None:
        """Why this conv cannot compute onnxruntime's QLinearConv arithmetic, or None."""
        if self.output != "uint8":
            return "a float32 output (onnxruntime runs such a conv in float)"
        if self.residual:
            return "a fused residual add (QLinearConv has none: build with residual_adds='separate')"
        if self.post_op not in CLAMP_POST_OPS:
            return f"post-op {self.post_op!r} (QLinearConv fuses only {', '.join(CLAMP_POST_OPS)})"
        return None

    def add_pre_padding(self, pad: Sequence[int]) -> None:
        """Pad the codes by ``pad`` more (an ``F.pad`` spec, last dim first) before the kernel:
        a zero pad in front of a zero-padding conv, absorbed."""
        if self.padding_mode != "zeros" or len(pad) != 2 * self.spatial_dims:
            raise ConfigError(f"add_pre_padding needs zero padding and {2 * self.spatial_dims} values, "
                              f"got mode {self.padding_mode!r} and {tuple(pad)}")
        mine = self.pre_padding or (0,) * len(pad)
        self.pre_padding = tuple(a + int(b) for a, b in zip(mine, pad))

    def padded_shape(self, input_shape: Sequence[int]) -> tuple[int, ...]:
        """The shape the kernel sees: ``input_shape`` after the ``pre_padding``."""
        shape = list(input_shape)
        for i in range(len(self.pre_padding) // 2):
            shape[-1 - i] += self.pre_padding[2 * i] + self.pre_padding[2 * i + 1]
        return tuple(shape)

    def kernel_support(self, input_shape: Sequence[int]) -> Support:
        """Whether an ``(N, C, *spatial)`` input runs the oneDNN kernel, or why not."""
        if self.backend == "reference":
            return _REFERENCE_ONLY
        geometry = supports_qconv(self.weight.shape, self.padded_shape(input_shape), stride=self.stride,
                                  padding=self.padding, dilation=self.dilation, groups=self.groups,
                                  post_op=self.post_op, residual=self.residual)
        return geometry and int8_weight_support(self.weight)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if x.dtype != torch.uint8 or x.dim() != self.spatial_dims + 2:
            raise InputError(f"{type(self).__name__} expects a {self.spatial_dims + 2}-D uint8 activation "
                             f"(quantized upstream), got {x.dim()}-D {x.dtype}; put a Quantize module in front")
        if residual is not None and not self.residual:
            raise InputError(f"this {type(self).__name__} has no fused residual; build it with residual=True")
        if may_plan():
            plan = self._eager_plan
            if plan is None or not plan.holds(x, self._buffers):
                plan = self._plan(x)
            if plan.call is not None:
                if self.arithmetic == "onnxruntime":
                    return plan.call(x)
                if not self.residual:
                    return plan.call(x)
                r = self._accumulator(x, residual, plan.output_shape)
                plan.call(x, r)
                return r
        uint8_out = self.output == "uint8"
        head = (x, self.weight, self.weight_scale, self.bias, self.input_scale, self.input_zero_point,
                self.output_scale if uint8_out else None, self.output_zero_point if uint8_out else None)
        tail = (self.stride, self.padding, self.dilation, self.groups, self.pre_padding, self.padding_mode,
                self.post_op, self.post_op_args, self.use_kernels)
        if self.arithmetic == "onnxruntime":
            return run_op("qconv_onnxruntime", *head, *tail)
        if not self.residual:
            return run_op("qconv", *head, *tail)
        r = self._accumulator(x, residual, self._out_shape(self.padded_shape(x.shape)))
        run_op("qconv_add_", *head, r, self.residual_scale if uint8_out else None,
               self.residual_zero_point if uint8_out else None, *tail)
        return r

    def _accumulator(self, x: torch.Tensor, residual: torch.Tensor | None, out_shape: torch.Size) -> torch.Tensor:
        """The checked residual as the tensor the fused sum writes into: itself where it is
        consumed and channels-last, else a channels-last copy."""
        r = self._check_residual(x, residual, torch.uint8 if self.output == "uint8" else torch.float32, out_shape)
        if not (self.consume_residual and r.is_contiguous(memory_format=torch.channels_last)):
            r = r.clone(memory_format=torch.channels_last)
        return r

    def _plan(self, x: torch.Tensor) -> EagerPlan:
        """Choose the kernel for inputs shaped like ``x`` now and remember the choice
        (:mod:`fxcompress.quant.eager_plan`)."""
        uint8_out, padded = self.output == "uint8", self.padded_shape(x.shape)
        if self.arithmetic == "onnxruntime":
            call = fxcompress.oplib.impl_onnxruntime.qconv_onnxruntime_plan(
                padded, self.weight, self.weight_scale, self.bias, self.input_scale, self.input_zero_point,
                self.output_scale, self.output_zero_point, self.stride, self.padding, self.dilation, self.groups,
                self.pre_padding, self.padding_mode, self.post_op, self.post_op_args, self.use_kernels)
        else:
            call = fxcompress.oplib.impl.conv_plan(
                padded, self.weight, self.weight_scale, self.bias, self.input_scale, self.input_zero_point,
                self.output_scale if uint8_out else None, self.output_zero_point if uint8_out else None,
                self.residual_scale if uint8_out and self.residual else None,
                self.residual_zero_point if uint8_out and self.residual else None, self.stride, self.padding,
                self.dilation, self.groups, self.pre_padding, self.padding_mode, self.post_op, self.post_op_args,
                self.residual, self.use_kernels)
        plan = EagerPlan.make(x, self._buffers, call, self._out_shape(padded))
        self.__dict__["_eager_plan"] = plan  # a plain attribute: nn.Module.__setattr__ has nothing to register
        return plan

    def _out_shape(self, shape: Sequence[int]) -> torch.Size:
        """``(C_out, *spatial)`` of the output for a padded input of ``shape``."""
        spatial = ((shape[2 + i] + 2 * self.padding[i] - self.dilation[i] * (self.kernel_size[i] - 1) - 1)
                   // self.stride[i] + 1 for i in range(self.spatial_dims))
        return torch.Size((self.out_channels, *spatial))

    @staticmethod
    def _check_residual(x: torch.Tensor, r: torch.Tensor | None, dtype: torch.dtype,
                        out_shape: torch.Size) -> torch.Tensor:
        if r is None:
            raise InputError("a conv with residual=True needs forward(x, residual)")
        if r.dtype != dtype or r.shape[1:] != out_shape or r.shape[0] != x.shape[0]:
            raise InputError(f"the conv's residual must be {dtype} of shape "
                             f"{(x.shape[0], *out_shape)}, got {r.dtype} {tuple(r.shape)}")
        return r

    def extra_repr(self) -> str:
        out = (f"out=({summarize(self.output_scale)}, {int(self.output_zero_point)})"
               if self.output == "uint8" else "out=float32")
        extra = f", residual{'(consumed)' if self.consume_residual else ''}" if self.residual else ""
        pad = f", padding_mode={self.padding_mode}" if self.padding_mode != "zeros" else ""
        pad += f", pre_padding={self.pre_padding}" if self.pre_padding else ""
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}{pad}, dilation={self.dilation}, "
                f"groups={self.groups}, post_op={self.post_op}{extra}, bits=8, "
                f"w_scale={summarize(self.weight_scale)}, in=({summarize(self.input_scale)}, "
                f"{int(self.input_zero_point)}), {out}, backend={self.backend}"
                + (f", arithmetic={self.arithmetic}" if self.arithmetic != "onednn" else ""))


def _check_post_op(post_op: str, args: Sequence[float], dims: int) -> tuple[float, ...]:
    fused = CONV_POST_OPS_BY_DIMS[dims]
    if post_op not in fused:
        raise ConfigError(f"post_op must be one of {', '.join(fused)} for a {dims}-D conv; got {post_op!r}")
    if len(args) != CONV_POST_OPS[post_op]:
        raise ConfigError(f"post_op {post_op!r} takes {CONV_POST_OPS[post_op]} arguments, got {tuple(args)}")
    return tuple(float(a) for a in args)


class QuantConv1d(QuantConvNd):
    """Static int8 1-D conv (see :class:`QuantConvNd`)."""

    spatial_dims = 1


class QuantConv2d(QuantConvNd):
    """Static int8 2-D conv (see :class:`QuantConvNd`); the only one that fuses a residual add."""

    spatial_dims = 2
    _fxc_name = "fxcompress.quant.lowered.QuantConv2d"  # where it lived first: artifacts name it so


class QuantConv3d(QuantConvNd):
    """Static int8 3-D conv (see :class:`QuantConvNd`)."""

    spatial_dims = 3


def _count_conv_macs(gm: torch.fx.GraphModule, node: torch.fx.Node) -> dict[str, int]:
    return macs.count_conv(gm, node, gm.get_submodule(str(node.target)).weight.shape)


# Registered here, next to the classes: whichever pass creates them, their MACs count.
for _conv in (QuantConv1d, QuantConv2d, QuantConv3d):
    macs.register_module(_conv, _count_conv_macs)
