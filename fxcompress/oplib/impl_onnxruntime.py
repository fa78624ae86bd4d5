"""The operators computing onnxruntime's QLinear arithmetic (:mod:`fxcompress.oplib.arith_onnxruntime`).

Each is the CPU implementation of one ``*_onnxruntime`` operator of :mod:`fxcompress.oplib.library`:
what the modules a lowering made with ``arithmetic="onnxruntime"`` call, with the same
arguments as their default twins in :mod:`fxcompress.oplib.impl` (and the same output layouts).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from fxcompress.oplib import arith_onnxruntime as ort_arith
from fxcompress.oplib import cache
from fxcompress.oplib.arith import apply_post_op
from fxcompress.oplib.errors import fail
from fxcompress.oplib.impl import _q, conv_plan, nonfinite_input_message, qconv, quantize_layout

__all__ = ["quantize_onnxruntime", "quantize_product_onnxruntime", "qconv_onnxruntime", "qconv_onnxruntime_plan",
           "add_onnxruntime", "mul_onnxruntime", "adaptive_avg_pool2d_onnxruntime"]


def quantize_onnxruntime(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, activation: str = "none",
                         activation_args: Sequence[float] = (), guard: str = "") -> torch.Tensor:
    """:func:`~fxcompress.oplib.impl.quantize` rounded as ONNX ``QuantizeLinear`` is: ``round(activation(x) / scale) + zero_point``."""
    if guard and x.is_floating_point() and not bool(torch.isfinite(x.sum())):
        fail("input", nonfinite_input_message(guard))
    q = ort_arith.quantize_linear_uint8(apply_post_op(x.float(), activation, activation_args), *_q(scale, zero_point))
    return q.contiguous(memory_format=quantize_layout(x))


def quantize_product_onnxruntime(x: torch.Tensor, gains: torch.Tensor, scale: torch.Tensor,
                                 zero_point: torch.Tensor) -> torch.Tensor:
    """:func:`~fxcompress.oplib.impl.quantize_product` as ONNX's ``Mul`` then ``QuantizeLinear`` compute it."""
    q = ort_arith.quantize_linear_uint8(x.float() * gains, *_q(scale, zero_point))
    layout = quantize_layout(x) if q.shape == x.shape else torch.contiguous_format
    return q.contiguous(memory_format=layout)


def _qlinearconv_constants(weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                           xs: float, os_: float, ozp: int, post_op: str,
                           post_op_args: Sequence[float]) -> tuple:
    """What :func:`qconv_onnxruntime` derives from the layer (cached per weight): unit weight
    scales, the int32 bias as float32 values, the unit input scale, the multiplier, the code bounds."""
    def build() -> tuple:
        ones = torch.ones_like(weight_scale, dtype=torch.float32)
        codes = None if bias is None else ort_arith.bias_codes(bias, xs, weight_scale).to(torch.float32)
        return (ones, codes, torch.tensor(1.0), ort_arith.qlinearconv_multiplier(xs, weight_scale, os_),
                ort_arith.code_bounds(post_op, post_op_args, os_, ozp))

    # Kept under the weight *scale*: the weight's own entry holds the kernel packed for
    # (weight, ones, codes), which another stamp on it would empty on every call.
    entry = cache.per_weight(weight_scale, weight, bias)
    return cache.remember(entry, ("onnxruntime", xs, os_, ozp, post_op, tuple(post_op_args)), build)


def qconv_onnxruntime(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                      input_scale: torch.Tensor, input_zero_point: torch.Tensor, output_scale: torch.Tensor | None,
                      output_zero_point: torch.Tensor | None, stride: Sequence[int], padding: Sequence[int],
                      dilation: Sequence[int], groups: int, pre_padding: Sequence[int] = (),
                      padding_mode: str = "zeros", post_op: str = "none", post_op_args: Sequence[float] = (),
                      use_kernels: bool = True) -> torch.Tensor:
    """:func:`~fxcompress.oplib.impl.qconv` (uint8 out, post-op none / relu / hardtanh) requantized as onnxruntime's
    ``QLinearConv``: the conv runs with unit scales and the int32 bias, so its float32 output
    is ``acc + bias`` exactly (below 2**24), then one multiplier per channel and the code clamp."""
    if output_scale is None or output_zero_point is None:
        fail("config", "onnxruntime's QLinearConv arithmetic needs a uint8 output (output_scale)")
    if post_op not in ort_arith.CLAMP_POST_OPS:
        fail("config", f"onnxruntime's QLinearConv arithmetic takes post-ops {ort_arith.CLAMP_POST_OPS}, "
                       f"got {post_op!r}")
    (xs, _), (os_, ozp) = _q(input_scale, input_zero_point), _q(output_scale, output_zero_point)
    ones, codes, one, multiplier, (low, high) = _qlinearconv_constants(weight, weight_scale, bias, xs, os_, ozp,
                                                                       post_op, post_op_args)
    y = qconv(x, weight, ones, codes, one, input_zero_point, None, None, stride, padding, dilation, groups,
              pre_padding, padding_mode, "none", (), use_kernels)
    return ort_arith.requantize_accumulator(y, multiplier, ozp, low, high)


def qconv_onnxruntime_plan(padded_shape: torch.Size, weight: torch.Tensor, weight_scale: torch.Tensor,
                           bias: torch.Tensor | None, input_scale: torch.Tensor, input_zero_point: torch.Tensor,
                           output_scale: torch.Tensor, output_zero_point: torch.Tensor, stride: Sequence[int],
                           padding: Sequence[int], dilation: Sequence[int], groups: int,
                           pre_padding: Sequence[int] = (), padding_mode: str = "zeros", post_op: str = "none",
                           post_op_args: Sequence[float] = (), use_kernels: bool = True) -> Callable | None:
    """The call :func:`qconv_onnxruntime` makes for inputs of ``padded_shape`` (after
    ``pre_padding``), as :func:`~fxcompress.oplib.impl.conv_plan` gives it for :func:`~fxcompress.oplib.impl.qconv`; None where the reference runs."""
    (xs, _), (os_, ozp) = _q(input_scale, input_zero_point), _q(output_scale, output_zero_point)
    ones, codes, one, multiplier, (low, high) = _qlinearconv_constants(weight, weight_scale, bias, xs, os_, ozp,
                                                                       post_op, post_op_args)
    kernel = conv_plan(padded_shape, weight, ones, codes, one, input_zero_point, None, None, None, None, stride,
                       padding, dilation, groups, pre_padding, padding_mode, "none", (), False, use_kernels)
    if kernel is None:
        return None
    return lambda x: ort_arith.requantize_accumulator(kernel(x), multiplier, ozp, low, high)


def mul_onnxruntime(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, a_zero_point: torch.Tensor,
                    b_scale: torch.Tensor, b_zero_point: torch.Tensor, output_scale: torch.Tensor,
                    output_zero_point: torch.Tensor) -> torch.Tensor:
    """:func:`~fxcompress.oplib.impl.mul` computed as onnxruntime's ``QLinearMul``."""
    (sa, za), (sb, zb), (so, zo) = _q(a_scale, a_zero_point), _q(b_scale, b_zero_point), _q(output_scale,
                                                                                         output_zero_point)
    return ort_arith.qlinear_mul_uint8(a, b, sa, za, sb, zb, so, zo)


def adaptive_avg_pool2d_onnxruntime(x: torch.Tensor, input_scale: torch.Tensor, input_zero_point: torch.Tensor,
                                    output_scale: torch.Tensor, output_zero_point: torch.Tensor,
                                    output_size: Sequence[int], use_kernels: bool = True) -> torch.Tensor:
    """:func:`~fxcompress.oplib.impl.adaptive_avg_pool2d` to ``(1, 1)`` computed as onnxruntime's ``QLinearGlobalAveragePool``."""
    if tuple(output_size) != (1, 1):
        fail("config", f"onnxruntime's QLinearGlobalAveragePool arithmetic pools to (1, 1), got {tuple(output_size)}")
    (xs, xzp), (os_, ozp) = _q(input_scale, input_zero_point), _q(output_scale, output_zero_point)
    return ort_arith.qlinear_global_average_pool_uint8(x, xs, xzp, os_, ozp)


def add_onnxruntime(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, a_zero_point: torch.Tensor,
                    b_scale: torch.Tensor, b_zero_point: torch.Tensor, output_scale: torch.Tensor,
                    output_zero_point: torch.Tensor, relu: bool = False, use_kernels: bool = True) -> torch.Tensor:
    """:func:`~fxcompress.oplib.impl.add` computed as onnxruntime's ``QLinearAdd`` (a ReLU as the clamp at the code of 0.0)."""
    (sa, za), (sb, zb), (so, zo) = _q(a_scale, a_zero_point), _q(b_scale, b_zero_point), _q(output_scale,
                                                                                         output_zero_point)
    y = ort_arith.qlinear_add_uint8(a, b, sa, za, sb, zb, so, zo, low=zo if relu else 0)
    return y.contiguous(memory_format=torch.channels_last if y.dim() == 4 else torch.contiguous_format)
