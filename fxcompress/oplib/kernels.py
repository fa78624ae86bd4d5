"""Thin, safe wrappers over the integer CPU kernels this torch build ships.

Why this module exists: oneDNN's int8 ops and aten's weight-only matmuls can crash the
process (``aten._weight_int8pack_mm`` segfaults with bf16 activations when K % 16 != 0)
instead of raising, and their argument conventions are undocumented. Every wrapper here
checks its preconditions in Python *before* calling the kernel and raises
a kernel error (``fxcompress.errors.LoweringError`` under fxcompress) when they fail; each ``supports_*`` predicate
answers the same question in advance with a :class:`Support` (truthy when the fast path
may be used, otherwise carrying the reason a lowering report shows).

Numeric conventions, shared with the reference path (:mod:`fxcompress.oplib.arith`):

* activations are uint8 affine per tensor: ``q = clamp(round(x * (1 / scale) + zp), 0, 255)``
  and ``x ~= (q - zp) * scale`` (see :mod:`fxcompress.oplib.arith`);
* static weights are int8 symmetric per output channel: ``w ~= q[c] * scale[c]`` (oneDNN
  ignores weight zero points, so none are stored);
* the oneDNN kernels requantize inside the kernel (round half to even); the reference
  path computes the arithmetic they are specified by (:mod:`fxcompress.oplib.arith`),
  and each kernel path (AVX2, AVX512-VNNI, AMX) is within one code of it per op
  (:mod:`fxcompress.quant.contract`). On CPUs whose int8 dot products saturate
  (:mod:`fxcompress.oplib.isa`), only weights that cannot overflow them take the kernels.

Facts checked on torch 2.14.1 (x86, AVX512-VNNI): prepacking a conv weight for the real
input height/width matters (a 512x512 3x3 conv on 7x7 ran 3.6x slower when packed
without the shape, because oneDNN then reorders the weight on every call); batch size
does not matter. ``qconv2d_pointwise.binary`` with ``sum`` writes the result into the
accumulator tensor *and* returns a copy of it.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from typing import Sequence

import torch

from fxcompress.oplib.errors import fail
from fxcompress.oplib.isa import PAIR_LIMIT, int8_arithmetic, pair_overflow

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
    "int8pack_mm",
    "int4pack_weight",
    "int4pack_scales_and_zeros",
    "int4pack_mm",
]

#: Unary post-ops the oneDNN int8 conv fuses, with the number of float arguments each takes
#: (``hardtanh``: min, max). ``swish`` is x * sigmoid(x) (SiLU).
CONV_POST_OPS: dict[str, int] = {"none": 0, "relu": 0, "hardswish": 0, "hardtanh": 2, "swish": 0}
#: The post-ops the int8 conv fuses, by spatial dimensionality (measured on torch 2.14.1: the
#: 1-D kernel takes only ReLU, the 3-D one none).
CONV_POST_OPS_BY_DIMS: dict[int, tuple[str, ...]] = {1: ("none", "relu"), 2: tuple(CONV_POST_OPS), 3: ("none",)}
#: Unary post-ops the oneDNN int8 linear fuses (``leaky_relu``: slope; ``gelu_tanh`` is
#: GELU with the tanh approximation).
LINEAR_POST_OPS: dict[str, int] = {
    "none": 0, "relu": 0, "gelu": 0, "gelu_tanh": 0, "tanh": 0,
    "hardswish": 0, "swish": 0, "leaky_relu": 1, "hardtanh": 2,
}
#: Every post-op name either kernel knows (what a float activation is called in the lowering).
POST_OPS: dict[str, int] = {**CONV_POST_OPS, **LINEAR_POST_OPS}
#: Group sizes ``aten._weight_int4pack_mm_for_cpu`` accepts.
INT4_GROUP_SIZES = (32, 64, 128, 256)
# The fused residual ``sum`` only combines with these unary post-ops (kernel check).
_SUM_POST_OPS = ("none", "relu")


@dataclass(frozen=True)
class Support:
    """Whether a fast kernel may run; falsy with the ``reason`` when it may not."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


_YES = Support(True)


def _no(reason: str) -> Support:
    return Support(False, reason)


def _require(support: Support, kernel: str) -> None:
    if not support:
        fail("kernel", f"{kernel}: {support.reason}. Use the reference path for this case "
                       f"(the matching supports_*() predicate tells you in advance).")


@functools.lru_cache(maxsize=None)
def onednn_int8_support() -> Support:
    """Whether oneDNN's int8 conv/linear kernels exist here: an x86-64 CPU, a torch built
    with oneDNN, and the ``onednn`` int8 ops registered.

    Whether a given layer may run on them is :func:`int8_weight_support`'s question: on
    CPUs whose int8 dot products saturate (AVX2, AVX512 without VNNI; see
    :mod:`fxcompress.oplib.isa`) only weights that cannot overflow are computed exactly.
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return _no(f"the oneDNN int8 kernels need an x86-64 CPU, this is {platform.machine()}")
    if not torch.backends.mkldnn.is_available():
        return _no("this torch build has no oneDNN (mkldnn) support")
    for name in ("qconv_prepack", "qconv_pointwise", "qconv2d_pointwise", "qlinear_prepack",
                 "qlinear_pointwise"):
        if not hasattr(torch.ops.onednn, name):
            return _no(f"this torch build lacks torch.ops.onednn.{name}")
    return _YES


def int8_weight_support(weight: torch.Tensor) -> Support:
    """Whether this process's oneDNN int8 kernels compute exactly with int8 ``weight``
    (output channels first), for every uint8 activation.

    Always on CPUs with exact 32-bit dot products (VNNI, AMX). On those that add
    products in saturating 16-bit pairs, only when no two same-sign weights of an output
    channel sum to more than 128 in magnitude (:func:`fxcompress.oplib.isa.pair_overflow`),
    which every weight of at most 7 bits satisfies.
    """
    base = onednn_int8_support()
    if not base:
        return base
    arithmetic = int8_arithmetic()
    if arithmetic.exact_products:
        return _YES
    worst = pair_overflow(weight)
    if worst is None:
        return _YES
    channel, a, b = worst
    return _no(f"this CPU's oneDNN int8 kernels ({arithmetic.describe()}) could overflow with these "
               f"weights (output channel {channel}: {a} + {b} > {PAIR_LIMIT}); weights of at most "
               f"7 bits (fxcompress.quant.spec.portable_weight_spec()) run on them exactly")


def _check_qparams(scale: float, zero_point: int, what: str) -> Support:
    if not (scale > 0.0 and scale < float("inf")):
        return _no(f"{what} scale must be positive and finite, got {scale}")
    if not 0 <= zero_point <= 255:
        return _no(f"{what} zero point must be in [0, 255] for uint8, got {zero_point}")
    return _YES


def conv_output_size(input_size: Sequence[int], kernel: Sequence[int], stride: Sequence[int],
                     padding: Sequence[int], dilation: Sequence[int]) -> tuple[int, ...]:
    """The spatial output size of a conv with symmetric numeric ``padding``."""
    return tuple((input_size[i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1
                 for i in range(len(kernel)))


def supports_qconv(
    weight_shape: Sequence[int],
    input_shape: Sequence[int],
    *,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    post_op: str = "none",
    residual: bool = False,
) -> Support:
    """Whether :class:`QConvKernel` can run this 1-, 2- or 3-D conv on a uint8 input.

    ``weight_shape`` is ``(out_channels, in_channels // groups, *kernel)`` and
    ``input_shape`` is ``(N, C, *spatial)``, with symmetric numeric ``padding``. Post-op
    names are those of :data:`CONV_POST_OPS`; a fused residual ``sum`` (2-D convs only:
    the only ``binary`` op this build has) combines only with ``none`` and ``relu``.
    """
    base = onednn_int8_support()
    if not base:
        return base
    if len(weight_shape) != len(input_shape) or len(weight_shape) not in (3, 4, 5):
        return _no(f"only 1-, 2- and 3-D convs are supported, with inputs of the same rank: got weight "
                   f"{tuple(weight_shape)} and input {tuple(input_shape)}")
    if input_shape[1] != weight_shape[1] * groups:
        return _no(f"input has {input_shape[1]} channels, the weight expects "
                   f"{weight_shape[1] * groups}")
    if min(conv_output_size(input_shape[2:], weight_shape[2:], stride, padding, dilation)) < 1:
        return _no(f"input {tuple(input_shape)} is too small for this kernel/padding")
    fused = CONV_POST_OPS_BY_DIMS[len(weight_shape) - 2]
    if post_op not in fused:
        return _no(f"post-op {post_op!r} is not fused by oneDNN's {len(weight_shape) - 2}-D int8 conv "
                   f"(fused: {', '.join(fused)})")
    if residual and len(weight_shape) != 4:
        return _no("a fused residual sum exists for 2-D convs only (onednn.qconv2d_pointwise.binary)")
    if residual and post_op not in _SUM_POST_OPS:
        return _no(f"a fused residual sum combines only with {_SUM_POST_OPS}, not {post_op!r}")
    return _YES


def supports_qlinear(in_features: int, post_op: str = "none") -> Support:
    """Whether :class:`QLinearKernel` can run a linear layer with this post-op."""
    base = onednn_int8_support()
    if not base:
        return base
    if in_features < 1:
        return _no(f"in_features must be positive, got {in_features}")
    if post_op not in LINEAR_POST_OPS:
        return _no(f"post-op {post_op!r} is not fused by oneDNN int8 linear "
                   f"(fused: {', '.join(LINEAR_POST_OPS)})")
    return _YES


def _onednn_post_op(post_op: str, args: Sequence[float]) -> tuple[str, list[float], str]:
    """Our post-op name -> oneDNN's (name, scalars, algorithm)."""
    if post_op == "gelu":
        return "gelu", [], "none"
    if post_op == "gelu_tanh":
        return "gelu", [], "tanh"
    return post_op, [float(a) for a in args], ""


def _check_args(post_op: str, args: Sequence[float], table: dict[str, int]) -> None:
    if post_op in table and len(args) != table[post_op]:
        fail("kernel", f"post-op {post_op!r} takes {table[post_op]} arguments, got {tuple(args)}")


class QConvKernel:
    """A oneDNN int8 1-, 2- or 3-D conv prepacked for one input geometry (C, *spatial).

    Call it with a uint8 ``(N, C, *spatial)`` tensor (channels-last avoids a copy inside the
    kernel); it returns the channels-last result, uint8 requantized with
    ``(output_scale, output_zero_point)`` or float32 when ``output_scale`` is None.
    The packed weight is an opaque oneDNN tensor: it cannot be copied or saved, so hold
    instances only in a rebuildable cache.
    """

    __slots__ = ("input_chw", "_tail", "_binary_head", "_binary_tail")

    def __init__(
        self,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        input_shape: Sequence[int],
        input_scale: float,
        input_zero_point: int,
        stride: Sequence[int],
        padding: Sequence[int],
        dilation: Sequence[int],
        groups: int,
        post_op: str = "none",
        post_op_args: Sequence[float] = (),
        output_scale: float | None = None,
        output_zero_point: int = 0,
        residual_scale: float | None = None,
        residual_zero_point: int = 0,
    ) -> None:
        """Check the preconditions, then prepack ``weight`` (int8) for ``input_shape``.

        ``residual_scale`` enables :meth:`add_` (fused ``sum``): for a uint8 output it is
        the uint8 residual's scale; for a float output pass 1.0 (the residual is float32).
        """
        stride, padding, dilation = list(stride), list(padding), list(dilation)
        _require(supports_qconv(weight.shape, input_shape, stride=stride, padding=padding,
                                dilation=dilation, groups=groups, post_op=post_op,
                                residual=residual_scale is not None), "onednn.qconv_pointwise")
        _check_args(post_op, post_op_args, CONV_POST_OPS)
        if weight.dtype != torch.int8:
            fail("kernel", f"onednn.qconv_pointwise needs an int8 weight, got {weight.dtype}")
        _require(int8_weight_support(weight), "onednn.qconv_pointwise")
        _require(_check_qparams(input_scale, input_zero_point, "input"), "onednn.qconv_pointwise")
        if output_scale is not None:
            _require(_check_qparams(output_scale, output_zero_point, "output"),
                     "onednn.qconv_pointwise")
        w_scale = weight_scale.detach().to(torch.float32).contiguous()
        packed = torch.ops.onednn.qconv_prepack(
            weight.detach().contiguous(), w_scale, float(input_scale), int(input_zero_point),
            stride, padding, dilation, groups, [int(d) for d in input_shape])
        w_zp = torch.zeros(weight.shape[0], dtype=torch.int64)
        b = None if bias is None else bias.detach().to(torch.float32).contiguous()
        out_dtype = None if output_scale is not None else torch.float32
        o_scale = 1.0 if output_scale is None else float(output_scale)
        o_zp = 0 if output_scale is None else int(output_zero_point)
        name, scalars, algo = _onednn_post_op(post_op, post_op_args)
        self.input_chw = torch.Size(input_shape[1:])
        head = (float(input_scale), int(input_zero_point), packed, w_scale, w_zp)
        self._tail = head + (b, stride, padding, dilation, groups, o_scale, o_zp, out_dtype,
                             name, scalars, algo)
        self._binary_head = head
        self._binary_tail = None
        if residual_scale is not None:
            r_scale = float(residual_scale) if output_scale is not None else 1.0
            r_zp = int(residual_zero_point) if output_scale is not None else 0
            self._binary_tail = (b, stride, padding, dilation, groups, o_scale, o_zp, out_dtype,
                                 r_scale, r_zp, "sum", 1.0, name, [], "")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Conv + bias + post-op (+ requantize) of a uint8 input of the packed geometry."""
        return torch.ops.onednn.qconv_pointwise.default(x, *self._tail)

    def add_(self, x: torch.Tensor, accum: torch.Tensor) -> torch.Tensor:
        """``post_op(conv(x) + accum)``, written into ``accum`` (clobbered) and returned.

        ``accum`` must be channels-last contiguous, of the output's shape, uint8 with the
        residual qparams given at construction (float32 for a float output).
        """
        if self._binary_tail is None:
            fail("kernel", "QConvKernel.add_: this kernel was built without residual qparams")
        return torch.ops.onednn.qconv2d_pointwise.binary(
            x, *self._binary_head, accum, *self._binary_tail)


class QLinearKernel:
    """A oneDNN int8 linear with a prepacked weight, for uint8 inputs of any rank >= 2.

    The activation qparams are call arguments, so one kernel serves static quantization
    (fixed qparams) and dynamic per-tensor quantization (qparams measured per call).
    Returns uint8 requantized with ``(output_scale, output_zero_point)``, or float32 when
    ``output_scale`` is None. The packed weight is opaque (not copyable or saveable).
    """

    __slots__ = ("in_features", "_packed", "_tail")

    def __init__(
        self,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        post_op: str = "none",
        post_op_args: Sequence[float] = (),
        output_scale: float | None = None,
        output_zero_point: int = 0,
    ) -> None:
        """Check the preconditions, then prepack the int8 ``(out, in)`` weight."""
        _require(supports_qlinear(weight.shape[1], post_op), "onednn.qlinear_pointwise")
        _check_args(post_op, post_op_args, LINEAR_POST_OPS)
        if weight.dtype != torch.int8 or weight.dim() != 2:
            fail("kernel", f"onednn.qlinear_pointwise needs a 2-D int8 weight, got "
                                f"{weight.dim()}-D {weight.dtype}")
        _require(int8_weight_support(weight), "onednn.qlinear_pointwise")
        if output_scale is not None:
            _require(_check_qparams(output_scale, output_zero_point, "output"),
                     "onednn.qlinear_pointwise")
        self.in_features = int(weight.shape[1])
        self._packed = torch.ops.onednn.qlinear_prepack(weight.detach().contiguous(), None)
        w_scale = weight_scale.detach().to(torch.float32).contiguous()
        w_zp = torch.zeros(weight.shape[0], dtype=torch.int64)
        b = None if bias is None else bias.detach().to(torch.float32).contiguous()
        name, scalars, algo = _onednn_post_op(post_op, post_op_args)
        if output_scale is None:
            out = (1.0, 0, torch.float32)
        else:
            out = (float(output_scale), int(output_zero_point), None)
        self._tail = (self._packed, w_scale, w_zp, b) + out + (name, scalars, algo)

    def __call__(self, x: torch.Tensor, input_scale: float, input_zero_point: int) -> torch.Tensor:
        """``post_op(x_dequantized @ w.T + b)`` for a uint8 ``x`` of shape ``(*, in_features)``."""
        return torch.ops.onednn.qlinear_pointwise.default(
            x, input_scale, input_zero_point, *self._tail)


def supports_int8pack_mm(in_features: int, dtype: torch.dtype) -> Support:
    """Whether ``aten._weight_int8pack_mm`` may run with activations of ``dtype``.

    It segfaults with bf16/fp16 activations when K % 16 != 0 (checked here); with fp32
    activations it runs but about 40x slower than a float matmul, so it is refused.
    """
    if dtype not in (torch.bfloat16, torch.float16):
        return _no(f"int8pack_mm is only fast with bf16/fp16 activations, got {dtype}")
    if in_features % 16:
        return _no(f"int8pack_mm with {dtype} activations needs in_features % 16 == 0 "
                   f"(it crashes otherwise), got {in_features}")
    return _YES


def int8pack_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x @ (weight * scale[:, None]).T`` for int8 ``weight (N, K)``, per-row ``scale (N,)``."""
    if x.dim() != 2 or weight.dim() != 2 or weight.dtype != torch.int8:
        fail("kernel", f"_weight_int8pack_mm: needs 2-D x and a 2-D int8 weight, got "
                            f"{x.dim()}-D x and {weight.dim()}-D {weight.dtype} weight")
    if x.shape[1] != weight.shape[1] or scale.shape != weight.shape[:1]:
        fail("kernel", f"_weight_int8pack_mm: shapes disagree: x {tuple(x.shape)}, weight "
                            f"{tuple(weight.shape)}, scale {tuple(scale.shape)}")
    _require(supports_int8pack_mm(weight.shape[1], x.dtype), "_weight_int8pack_mm")
    return torch.ops.aten._weight_int8pack_mm(
        x.contiguous(), weight.contiguous(), scale.to(x.dtype).contiguous())


def supports_int4pack_mm(out_features: int, in_features: int, group_size: int,
                         dtype: torch.dtype) -> Support:
    """Whether ``aten._weight_int4pack_mm_for_cpu`` may run.

    Needs group size 32/64/128/256, K % group == 0, N % 16 == 0; and bf16 activations,
    because with fp32 activations this build runs it ~50x slower than a float matmul.
    """
    if group_size not in INT4_GROUP_SIZES:
        return _no(f"int4pack_mm needs group size in {INT4_GROUP_SIZES}, got {group_size}")
    if in_features % group_size:
        return _no(f"int4pack_mm needs in_features % group_size == 0, got {in_features} % "
                   f"{group_size}")
    if out_features % 16:
        return _no(f"int4pack_mm needs out_features % 16 == 0, got {out_features}")
    if dtype != torch.bfloat16:
        return _no(f"int4pack_mm is only fast with bf16 activations, got {dtype}")
    return _YES


def int4pack_weight(codes: torch.Tensor) -> torch.Tensor:
    """Kernel layout of unsigned 4-bit codes ``(N, K)`` (values 0..15, any integer dtype).

    The result is a plain uint8 tensor, but its layout is specific to this CPU kernel:
    keep it in a cache and store the portable packing (``qparams.pack_int``) instead.
    """
    if codes.dim() != 2 or codes.shape[0] % 16:
        fail("kernel", f"_convert_weight_to_int4pack_for_cpu: needs (N, K) codes with "
                            f"N % 16 == 0, got {tuple(codes.shape)}")
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 2)


def int4pack_scales_and_zeros(scale: torch.Tensor, zero_point: torch.Tensor,
                              dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Kernel layout ``(K // group, N, 2)`` of per-group ``scale``/``zero_point`` ``(N, K // group)``.

    The kernel dequantizes as ``(q - 8) * scale + offset``; with our integer zero points
    (``w = (q - zp) * scale``) the offset is ``(8 - zp) * scale``.
    """
    offset = (8.0 - zero_point.to(torch.float32)) * scale
    return torch.stack([scale.t(), offset.t()], dim=-1).to(dtype).contiguous()


def int4pack_mm(x: torch.Tensor, packed: torch.Tensor, group_size: int,
                scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` for a 2-D bf16 ``x`` and int4 weight in kernel layout; returns bf16."""
    n = scales_and_zeros.shape[1]
    if x.dim() != 2 or packed.dim() != 2 or packed.shape[0] != n:
        fail("kernel", f"_weight_int4pack_mm_for_cpu: needs 2-D x and packed weight of "
                            f"{n} rows, got x {tuple(x.shape)}, packed {tuple(packed.shape)}")
    _require(supports_int4pack_mm(n, x.shape[1], group_size, x.dtype), "_weight_int4pack_mm_for_cpu")
    if scales_and_zeros.shape != (x.shape[1] // group_size, n, 2) or packed.shape[1] * 2 != x.shape[1]:
        fail("kernel", f"_weight_int4pack_mm_for_cpu: scales {tuple(scales_and_zeros.shape)} "
                            f"or packed weight {tuple(packed.shape)} do not match K={x.shape[1]}")
    return torch.ops.aten._weight_int4pack_mm_for_cpu(
        x.contiguous(), packed, group_size, scales_and_zeros.to(x.dtype))
