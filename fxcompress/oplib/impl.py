"""What each operator computes: the kernel where it may run for this call, else the reference.

Every function here is the CPU implementation of one operator of :mod:`fxcompress.oplib.library`
and is called either through the dispatcher (``torch.ops.fxcompress.<name>``: under
``torch.compile``, ``torch.export`` and in exported programs) or directly by fxcompress's
lowered modules when they run eagerly (the dispatcher's Python round trip costs about as
much as a small op). The two are the same computation.

The selection is made per call, on this machine: the oneDNN kernel when its preconditions
hold for the call's shapes and, on CPUs whose int8 products saturate (AVX2), for the
layer's weights (:func:`fxcompress.oplib.kernels.int8_weight_support`); otherwise the
reference arithmetic of :mod:`fxcompress.oplib.arith`, which the kernels are held to (one
code per op). ``use_kernels=False`` (``backend="reference"``) always takes the reference.
A program exported on one CPU therefore re-selects on the CPU that runs it.

Output layouts are fixed by the arguments alone, whichever path runs (the operators'
fake implementations promise them to the compiler): channels-last for 2-D and 3-D convs,
pools and 4-D adds; ``(N, L, C)`` strides for 1-D convs; contiguous for linears; the
input's layout for quantize when it is 4-D channels-last, contiguous otherwise.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from fxcompress.oplib import cache
from fxcompress.oplib.arith import (
    accumulate, add_dequantized, apply_post_op, choose_qparams_uint8, dequantize_uint8, max_pool2d_uint8,
    mul_uint8, quantize_per_token_uint8, quantize_product_uint8, quantize_uint8, rescale, unpack_unsigned,
)
from fxcompress.oplib.errors import fail
from fxcompress.oplib.kernels import (
    QConvKernel, QLinearKernel, int4pack_mm, int4pack_scales_and_zeros, int4pack_weight, int8_weight_support,
    int8pack_mm, supports_int4pack_mm, supports_int8pack_mm, supports_qconv,
    supports_qlinear,
)

__all__ = [
    "quantize", "quantize_product", "dequantize", "qconv", "qconv_add_", "qlinear", "max_pool2d",
    "adaptive_avg_pool2d", "add", "conv_plan", "dynamic_linear", "weight_only_linear", "weight_only_embedding", "prepack_qconv",
    "conv_output_layout", "nonfinite_input_message", "WEIGHT_ONLY_KERNEL_MAX_ROWS",
    "mul",
]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CL = {4: torch.channels_last, 5: torch.channels_last_3d}
# Above this many rows the weight-only kernels lose to a bf16 matmul with the cached
# dequantized weight (768x3072 and 3072x768 layers, 1 thread: the int4/int8 kernels are
# ~2x faster at 1-4 rows, ~1.4x slower at 16).
WEIGHT_ONLY_KERNEL_MAX_ROWS = 8
_COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _q(scale: torch.Tensor | None, zero_point: torch.Tensor | None) -> tuple[float | None, int]:
    if scale is None:
        return None, 0
    return float(cache.scalar(scale)), int(cache.scalar(zero_point)) if zero_point is not None else 0


def quantize_layout(x: torch.Tensor) -> torch.memory_format:
    """The layout of a quantized ``x``: channels-last where ``x`` is 4-D channels-last, else contiguous."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def nonfinite_input_message(name: str) -> str:
    """What the NaN/Inf check of graph input ``name`` says when it fails."""
    return (f"input {name!r} holds NaN or Inf values: a lowered int8 model cannot represent them "
            f"(the float model would return NaN or Inf); check or clean the input")


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, activation: str = "none",
             activation_args: Sequence[float] = (), guard: str = "") -> torch.Tensor:
    """``quantize_uint8(activation(x))``; with ``guard`` (the graph input's name), NaN/Inf refused."""
    if guard and x.is_floating_point() and not bool(torch.isfinite(x.sum())):
        fail("input", nonfinite_input_message(guard))
    q = quantize_uint8(x, *_q(scale, zero_point), activation, activation_args)
    return q.contiguous(memory_format=quantize_layout(x))


def quantize_product(x: torch.Tensor, gains: torch.Tensor, scale: torch.Tensor,
                     zero_point: torch.Tensor) -> torch.Tensor:
    """``quantize_uint8(x * gains)`` (a squeeze-excitation gate), without the product in memory."""
    q = quantize_product_uint8(x, gains, *_q(scale, zero_point))
    layout = quantize_layout(x) if q.shape == x.shape else torch.contiguous_format
    return q.contiguous(memory_format=layout)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """uint8 codes -> float32 ``(q - zero_point) * scale``, keeping the memory format."""
    return dequantize_uint8(q, *_q(scale, zero_point))


def conv_output_layout(dims: int) -> str:
    """How a conv of ``dims`` spatial dims lays out its output: ``channels_last`` or ``nlc`` (1-D)."""
    return "nlc" if dims == 1 else "channels_last"


def _pad_codes(x: torch.Tensor, pre_padding: Sequence[int], padding_mode: str, zero_point: int) -> torch.Tensor:
    if not pre_padding:
        return x
    if padding_mode == "zeros":
        return F.pad(x, list(pre_padding), mode="constant", value=zero_point)  # the code of 0.0
    return F.pad(x, list(pre_padding), mode=padding_mode)


def _conv_kernel(weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 shape: torch.Size, xs: float, xzp: int, os_: float | None, ozp: int, rs: float | None, rzp: int,
                 stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
                 post_op: str, post_op_args: Sequence[float], residual: bool,
                 use_kernels: bool) -> QConvKernel | None:
    """The packed kernel for this call, or None where the reference must run (cached per weight)."""
    if not use_kernels:
        return None
    entry = cache.per_weight(weight, weight_scale, bias)
    if not cache.remember(entry, "weights_ok", lambda: bool(int8_weight_support(weight))):
        return None
    key = (tuple(shape[1:]), xs, xzp, os_, ozp, rs, rzp, tuple(stride), tuple(padding), tuple(dilation), groups,
           post_op, tuple(post_op_args), residual)

    def build() -> QConvKernel | bool:
        if not supports_qconv(weight.shape, shape, stride=stride, padding=padding, dilation=dilation,
                              groups=groups, post_op=post_op, residual=residual):
            return False
        return QConvKernel(weight, weight_scale, bias, input_shape=shape, input_scale=xs, input_zero_point=xzp,
                           stride=stride, padding=padding, dilation=dilation, groups=groups, post_op=post_op,
                           post_op_args=post_op_args, output_scale=os_, output_zero_point=ozp,
                           residual_scale=(rs if os_ is not None else 1.0) if residual else None,
                           residual_zero_point=rzp)

    found = cache.remember(entry, key, build)
    return found or None


def _conv_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                    xs: float, xzp: int, os_: float | None, ozp: int, stride: Sequence[int],
                    padding: Sequence[int], dilation: Sequence[int], groups: int, post_op: str,
                    post_op_args: Sequence[float], residual: torch.Tensor | None = None, rs: float | None = None,
                    rzp: int = 0) -> torch.Tensor:
    """The arithmetic the kernel is held to, with portable ops (:mod:`fxcompress.oplib.arith`)."""
    dims = weight.dim() - 2
    conv = _CONV[dims]
    acc = accumulate(lambda a, w: conv(a, w, None, list(stride), list(padding), list(dilation), groups),
                     x.to(torch.int16) - xzp, weight)
    y = rescale(acc, xs, weight_scale, bias, 1)
    if residual is not None:
        y = add_dequantized(y, residual, rs, rzp) if rs is not None else y + residual
    y = _conv_layout(apply_post_op(y, post_op, post_op_args))
    return y if os_ is None else _conv_layout(quantize_uint8(y, os_, ozp))


def _conv_layout(y: torch.Tensor) -> torch.Tensor:
    """The kernels' output layout: channels-last (2-D, 3-D convs) or ``(N, L, C)`` strides (1-D)."""
    if y.dim() in _CL:
        return y.contiguous(memory_format=_CL[y.dim()])
    return y.transpose(1, 2).contiguous().transpose(1, 2)


def qconv(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
          input_scale: torch.Tensor, input_zero_point: torch.Tensor, output_scale: torch.Tensor | None,
          output_zero_point: torch.Tensor | None, stride: Sequence[int], padding: Sequence[int],
          dilation: Sequence[int], groups: int, pre_padding: Sequence[int] = (), padding_mode: str = "zeros",
          post_op: str = "none", post_op_args: Sequence[float] = (), use_kernels: bool = True) -> torch.Tensor:
    """Static int8 1-, 2- or 3-D conv of uint8 codes: ``requant(post_op(conv(pad(deq(x)), deq(w)) + b))``;
    float32 out when ``output_scale`` is None."""
    (xs, xzp), (os_, ozp) = _q(input_scale, input_zero_point), _q(output_scale, output_zero_point)
    x = _pad_codes(x, pre_padding, padding_mode, xzp)
    kernel = _conv_kernel(weight, weight_scale, bias, x.shape, xs, xzp, os_, ozp, None, 0, stride, padding,
                          dilation, groups, post_op, post_op_args, False, use_kernels)
    if kernel is not None:
        return kernel(x)
    return _conv_reference(x, weight, weight_scale, bias, xs, xzp, os_, ozp, stride, padding, dilation, groups,
                           post_op, post_op_args)


def prepack_qconv(weight: torch.Tensor, weight_scale: torch.Tensor, input_scale: float, input_zero_point: int,
                  stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
                  input_shape: Sequence[int] | None) -> torch.Tensor:
    """oneDNN's packed copy of an int8 conv weight, for inputs of ``input_shape`` (the
    implementation of ``torch.ops.fxcompress.prepack_qconv``, whose fake implementation gives
    compilers the weight's logical shape: oneDNN's own prepack op has none)."""
    return torch.ops.onednn.qconv_prepack(weight.contiguous(), weight_scale.contiguous(), float(input_scale),
                                          int(input_zero_point), list(stride), list(padding), list(dilation),
                                          groups, None if input_shape is None else list(input_shape))


def qconv_add_(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
               input_scale: torch.Tensor, input_zero_point: torch.Tensor, output_scale: torch.Tensor | None,
               output_zero_point: torch.Tensor | None, residual: torch.Tensor, residual_scale: torch.Tensor | None,
               residual_zero_point: torch.Tensor | None, stride: Sequence[int], padding: Sequence[int],
               dilation: Sequence[int], groups: int, pre_padding: Sequence[int] = (), padding_mode: str = "zeros",
               post_op: str = "none", post_op_args: Sequence[float] = (), use_kernels: bool = True) -> None:
    """:func:`qconv` with the residual added before the post-op (oneDNN's fused ``sum``), written
    into ``residual`` (channels-last contiguous, of the output's shape and dtype)."""
    (xs, xzp), (os_, ozp) = _q(input_scale, input_zero_point), _q(output_scale, output_zero_point)
    rs, rzp = _q(residual_scale, residual_zero_point) if os_ is not None else (None, 0)
    x = _pad_codes(x, pre_padding, padding_mode, xzp)
    kernel = _conv_kernel(weight, weight_scale, bias, x.shape, xs, xzp, os_, ozp, rs, rzp, stride, padding,
                          dilation, groups, post_op, post_op_args, True, use_kernels)
    if kernel is not None:
        kernel.add_(x, residual)  # writes into residual (and returns a copy, not needed)
        return
    residual.copy_(_conv_reference(x, weight, weight_scale, bias, xs, xzp, os_, ozp, stride, padding, dilation,
                                   groups, post_op, post_op_args, residual, rs, rzp))


def conv_plan(padded_shape: torch.Size, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
              input_scale: torch.Tensor, input_zero_point: torch.Tensor, output_scale: torch.Tensor | None,
              output_zero_point: torch.Tensor | None, residual_scale: torch.Tensor | None,
              residual_zero_point: torch.Tensor | None, stride: Sequence[int], padding: Sequence[int],
              dilation: Sequence[int], groups: int, pre_padding: Sequence[int] = (), padding_mode: str = "zeros",
              post_op: str = "none", post_op_args: Sequence[float] = (), residual: bool = False,
              use_kernels: bool = True) -> Callable | None:
    """The kernel call :func:`qconv` (with ``residual``, :func:`qconv_add_`) makes for inputs
    whose shape after ``pre_padding`` is ``padded_shape``, with these tensors as they hold now:
    ``call(x)`` (``call(x, accum)``, written into ``accum``); None where the operator takes the
    reference arithmetic. Valid while the tensors are unchanged (:mod:`fxcompress.quant.eager_plan`
    holds it to that)."""
    (xs, xzp), (os_, ozp) = _q(input_scale, input_zero_point), _q(output_scale, output_zero_point)
    rs, rzp = _q(residual_scale, residual_zero_point) if residual and os_ is not None else (None, 0)
    kernel = _conv_kernel(weight, weight_scale, bias, torch.Size(padded_shape), xs, xzp, os_, ozp, rs, rzp, stride,
                          padding, dilation, groups, post_op, post_op_args, residual, use_kernels)
    if kernel is None:
        return None
    if not pre_padding:
        return kernel.add_ if residual else kernel
    pre, mode = tuple(pre_padding), padding_mode
    if residual:
        return lambda x, accum: kernel.add_(_pad_codes(x, pre, mode, xzp), accum)
    return lambda x: kernel(_pad_codes(x, pre, mode, xzp))


def qlinear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
            input_scale: torch.Tensor, input_zero_point: torch.Tensor, output_scale: torch.Tensor | None,
            output_zero_point: torch.Tensor | None, post_op: str = "none", post_op_args: Sequence[float] = (),
            use_kernels: bool = True) -> torch.Tensor:
    """Static int8 linear of uint8 codes (any rank >= 2), uint8 or float32 (``output_scale`` None) out."""
    (xs, xzp), (os_, ozp) = _q(input_scale, input_zero_point), _q(output_scale, output_zero_point)
    kernel = None
    if use_kernels:
        entry = cache.per_weight(weight, weight_scale, bias)

        def build() -> QLinearKernel | bool:
            if not (supports_qlinear(weight.shape[1], post_op) and int8_weight_support(weight)):
                return False
            return QLinearKernel(weight, weight_scale, bias, post_op=post_op, post_op_args=post_op_args,
                                 output_scale=os_, output_zero_point=ozp)

        kernel = cache.remember(entry, (os_, ozp, post_op, tuple(post_op_args)), build) or None
    if kernel is not None:
        return kernel(x, xs, xzp)
    y = apply_post_op(rescale(accumulate(F.linear, x.to(torch.int16) - xzp, weight), xs, weight_scale, bias, -1),
                      post_op, post_op_args)
    return y if os_ is None else quantize_uint8(y, os_, ozp)


def max_pool2d(x: torch.Tensor, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
               dilation: Sequence[int], ceil_mode: bool = False, use_kernels: bool = True) -> torch.Tensor:
    """Exact max pool of uint8 codes (qparams pass through), channels-last out."""
    y = max_pool2d_uint8(x, kernel_size, stride, padding, dilation, ceil_mode, use_kernel=use_kernels)
    return y.contiguous(memory_format=torch.channels_last)


def _window_mean(x: torch.Tensor, window: tuple[int, int], xs: float, xzp: int) -> torch.Tensor:
    """The pooling kernel's arithmetic: exact window sums, then ``* xs * (1 / count)``."""
    sums = F.avg_pool2d(x.to(torch.float64) - xzp, window, window, divisor_override=1)
    inverse_count = torch.tensor(1.0 / (window[0] * window[1]), dtype=torch.float32)
    return rescale(sums, xs, inverse_count, None, 1).contiguous(memory_format=torch.channels_last)


def adaptive_avg_pool2d(x: torch.Tensor, input_scale: torch.Tensor, input_zero_point: torch.Tensor,
                        output_scale: torch.Tensor, output_zero_point: torch.Tensor, output_size: Sequence[int],
                        use_kernels: bool = True) -> torch.Tensor:
    """uint8 adaptive average pool, requantized; equal windows run as a oneDNN depthwise conv with
    all-ones weights (exact integer sums)."""
    (xs, xzp), (os_, ozp) = _q(input_scale, input_zero_point), _q(output_scale, output_zero_point)
    (oh, ow), (h, w), c = output_size, x.shape[2:], x.shape[1]
    window = (h // oh, w // ow) if h % oh == 0 and w % ow == 0 else None
    if window is None:  # no kernel computes it: the float mean
        y = quantize_uint8(F.adaptive_avg_pool2d(dequantize_uint8(x, xs, xzp), list(output_size)), os_, ozp)
        return y.contiguous(memory_format=torch.channels_last)
    kh, kw = window
    ok = use_kernels and supports_qconv((c, 1, kh, kw), x.shape, stride=window, padding=(0, 0), dilation=(1, 1),
                                        groups=c)
    if not ok:
        return quantize_uint8(_window_mean(x, window, xs, xzp), os_, ozp).contiguous(memory_format=torch.channels_last)
    # Weights 1 with scale 1/(kh*kw): the kernel sums exactly in int32, then scales.
    kernel = cache.shared(("avg", tuple(x.shape[1:]), window, xs, xzp, os_, ozp), lambda: QConvKernel(
        torch.ones(c, 1, kh, kw, dtype=torch.int8), torch.full((c,), 1.0 / (kh * kw)), None, input_shape=x.shape,
        input_scale=xs, input_zero_point=xzp, stride=window, padding=(0, 0), dilation=(1, 1), groups=c,
        output_scale=os_, output_zero_point=ozp))
    return kernel(x)


def add(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, a_zero_point: torch.Tensor, b_scale: torch.Tensor,
        b_zero_point: torch.Tensor, output_scale: torch.Tensor, output_zero_point: torch.Tensor, relu: bool = False,
        use_kernels: bool = True) -> torch.Tensor:
    """``requant(deq(a) + deq(b))`` (optionally ReLU-ed) of uint8 codes; same-shape 4-D inputs run as a
    oneDNN depthwise 1x1 conv of ``a`` (weights 1) with ``b`` fused as ``sum``."""
    (sa, za), (sb, zb), (so, zo) = _q(a_scale, a_zero_point), _q(b_scale, b_zero_point), _q(output_scale,
                                                                                         output_zero_point)
    same = a.shape == b.shape and a.dim() == 4
    c = a.shape[1] if a.dim() >= 2 else 0
    post_op = "relu" if relu else "none"
    if use_kernels and same and supports_qconv((c, 1, 1, 1), a.shape, stride=(1, 1), padding=(0, 0),
                                               dilation=(1, 1), groups=c, post_op=post_op, residual=True):
        kernel = cache.shared(("add", tuple(a.shape[1:]), sa, za, sb, zb, so, zo, relu), lambda: QConvKernel(
            torch.ones(c, 1, 1, 1, dtype=torch.int8), torch.ones(c), None, input_shape=a.shape, input_scale=sa,
            input_zero_point=za, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=c, post_op=post_op,
            output_scale=so, output_zero_point=zo, residual_scale=sb, residual_zero_point=zb))
        out = b.clone(memory_format=torch.channels_last)  # the kernel writes into it
        kernel.add_(a, out)
        return out
    # The fused kernel's arithmetic: b is added with one rounding.
    y = add_dequantized(dequantize_uint8(a, sa, za), b, sb, zb)
    y = quantize_uint8(y.relu_() if relu else y, so, zo)
    return y.contiguous(memory_format=torch.channels_last if y.dim() == 4 else torch.contiguous_format)


def per_token_kernel(weight: torch.Tensor, weight_scale: torch.Tensor) -> QLinearKernel | None:
    """The oneDNN qlinear that runs a per-token dynamic linear here, or None (reference path).

    It takes the uint8 codes of the rows (scale 1, the rows' zero point) and applies the
    weight scales in the kernel; the rows' scales and the bias follow in one pass. It runs
    where the qlinear kernel exists and computes exactly with these weights: always on CPUs
    with exact int8 products (VNNI, AMX), for weights of at most 7 bits on those whose
    products saturate (AVX2: uint8 inputs meet saturating 16-bit pair sums). Preferred to
    ``torch._int_mm`` by measurement (AVX512-VNNI AMD EPYC, 1 thread, MiniLM's 1050-row
    linears: the same GEMM time, and the int32 -> float conversion, both scales and the bias
    cost four passes over the output instead of one).
    """
    entry = cache.per_weight(weight, weight_scale)
    return cache.remember(entry, "per_token", lambda: QLinearKernel(weight, weight_scale, None) if (
        supports_qlinear(weight.shape[1]) and int8_weight_support(weight)) else False) or None


def dynamic_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                   granularity: str = "per_tensor", use_kernels: bool = True,
                   token_zero_point: int = 128) -> torch.Tensor:
    """int8 weights, activations quantized per call to uint8: ``per_tensor`` (one scale and
    zero point for the whole input) or ``per_token`` (a scale per row, ``token_zero_point``
    for every row: :func:`~fxcompress.oplib.arith.quantize_per_token_uint8`); float in, float
    out (the input's dtype)."""
    n, k = weight.shape
    if x.numel() == 0:  # an empty batch has no range to quantize with: its output is empty too
        return x.new_empty((*x.shape[:-1], n))
    if granularity == "per_tensor":
        kernel = None
        if use_kernels:
            entry = cache.per_weight(weight, weight_scale, bias)
            kernel = cache.remember(entry, "dynamic", lambda: QLinearKernel(weight, weight_scale, bias) if (
                supports_qlinear(k) and int8_weight_support(weight)) else False) or None
        scale, zp = choose_qparams_uint8(x)
        q = quantize_uint8(x, scale, zp)
        if kernel is not None:
            return kernel(q, scale, zp).to(x.dtype)
        xq = dequantize_uint8(q, scale, zp)
    elif granularity == "per_token":
        q, s = quantize_per_token_uint8(x if x.dtype == torch.float32 else x.float(), token_zero_point)
        kernel = per_token_kernel(weight, weight_scale) if use_kernels else None
        if kernel is not None:
            y, s = kernel(q, 1.0, token_zero_point), s.detach()  # acc * weight_scale, float32 (no gradient)
            y = y.mul_(s) if bias is None else torch.addcmul(bias, y, s, out=y)
            return y.to(x.dtype)
        xq = (q.float() - token_zero_point).mul_(s)
    else:
        fail("config", f"granularity must be 'per_tensor' or 'per_token', got {granularity!r}")
    entry = cache.per_weight(weight, weight_scale)
    w = cache.remember(entry, "dequantized", lambda: weight.float() * weight_scale[:, None])
    return F.linear(xq, w, bias).to(x.dtype)


def _dequantized_weight(weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, bits: int,
                        in_features: int, dtype: torch.dtype) -> torch.Tensor:
    n, groups = scale.shape
    g = in_features // groups
    if bits == 8:
        w = weight.to(dtype).view(n, groups, g)
    else:
        codes = unpack_unsigned(weight, bits, (n, in_features)).to(dtype).view(n, groups, g)
        w = codes.sub_(zero_point.to(dtype)[..., None])
    return w.mul_(scale.to(dtype)[..., None]).view(n, in_features)


def weight_only_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                       bias: torch.Tensor | None, bits: int, in_features: int, compute_dtype: str = "bfloat16",
                       cache_dequantized: bool = True, use_kernels: bool = True) -> torch.Tensor:
    """Weight-only 8/4/2-bit linear (per-group scales along ``in_features``); float in, float out.

    The int4/int8 kernels (bf16 activations) run for at most
    :data:`WEIGHT_ONLY_KERNEL_MAX_ROWS` rows where their preconditions hold; otherwise the
    weight is dequantized (once, cached, unless ``cache_dequantized=False``) and multiplied
    in ``compute_dtype``.
    """
    n, groups = scale.shape
    group = in_features // groups
    x2 = x.reshape(-1, in_features)
    rows = x2.shape[0]
    entry = cache.per_weight(weight, scale, zero_point)
    run = None
    if use_kernels and compute_dtype == "bfloat16" and rows <= WEIGHT_ONLY_KERNEL_MAX_ROWS:
        if bits == 4 and supports_int4pack_mm(n, in_features, group, torch.bfloat16):
            def build4():
                codes = unpack_unsigned(weight, 4, (n, in_features))
                packed, sz = int4pack_weight(codes), int4pack_scales_and_zeros(scale, zero_point)
                return lambda t: int4pack_mm(t.to(torch.bfloat16), packed, group, sz)
            run = cache.remember(entry, "kernel", build4)
        elif bits == 8 and group == in_features and supports_int8pack_mm(in_features, torch.bfloat16):
            s = scale[:, 0].to(torch.bfloat16)
            run = cache.remember(entry, "kernel", lambda: lambda t: int8pack_mm(t.to(torch.bfloat16), weight, s))
    dtype = _COMPUTE_DTYPES[compute_dtype]
    if run is not None:
        y = run(x2)
    elif not cache_dequantized:  # the packed codes stay the only weight copy in memory
        y = F.linear(x2.to(dtype), _dequantized_weight(weight, scale, zero_point, bits, in_features, dtype))
    else:
        # Unpacking a 768x3072 int4 weight costs ~20x its bf16 matmul at one row.
        w = cache.remember(entry, ("dequantized", dtype),
                           lambda: _dequantized_weight(weight, scale, zero_point, bits, in_features, dtype))
        y = F.linear(x2.to(dtype), w)
    y = y.to(x.dtype)
    if bias is not None:
        y = y.add_(bias) if y.dtype == torch.float32 else y + bias.to(y.dtype)
    return y.view(*x.shape[:-1], n)


def weight_only_embedding(indices: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                          zero_point: torch.Tensor | None, bits: int, embedding_dim: int) -> torch.Tensor:
    """Rows ``indices`` of a weight-only 8/4/2-bit table, dequantized to float32.

    Only the gathered rows are unpacked and dequantized (per-group scales along
    ``embedding_dim``, as :func:`weight_only_linear`'s along ``in_features``): the table
    stays packed, so the memory a lookup touches is the rows it returns.
    """
    flat = indices.reshape(-1)
    rows, groups = weight.index_select(0, flat), scale.shape[1]
    g = embedding_dim // groups
    if bits == 8:
        codes = rows.to(torch.float32).view(-1, groups, g)
    else:
        codes = unpack_unsigned(rows, bits, (flat.numel(), embedding_dim)).to(torch.float32).view(-1, groups, g)
        codes = codes.sub_(zero_point.index_select(0, flat).to(torch.float32)[..., None])
    out = codes.mul_(scale.index_select(0, flat)[..., None])
    return out.view(*indices.shape, embedding_dim)


def mul(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, a_zero_point: torch.Tensor, b_scale: torch.Tensor,
        b_zero_point: torch.Tensor, output_scale: torch.Tensor, output_zero_point: torch.Tensor) -> torch.Tensor:
    """``requant(deq(a) * deq(b))`` of uint8 codes (broadcast): the folded graph's product."""
    (sa, za), (sb, zb), (so, zo) = _q(a_scale, a_zero_point), _q(b_scale, b_zero_point), _q(output_scale,
                                                                                         output_zero_point)
    return mul_uint8(a, b, sa, za, sb, zb, so, zo)
