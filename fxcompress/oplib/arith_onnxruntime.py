"""onnxruntime's QLinear arithmetic with torch ops: what its int8 kernels compute, bit for bit.

A lowered model whose ops compute this (``lower(arithmetic="onnxruntime")``) and its QDQ
export give the same codes in fxcompress and in onnxruntime, where onnxruntime fuses each
``DequantizeLinear -> Conv -> QuantizeLinear`` group into ``QLinearConv`` and each
``DequantizeLinear -> Add -> QuantizeLinear`` into ``QLinearAdd`` (its CPU provider, MLAS
kernels). The default arithmetic of fxcompress is oneDNN's (:mod:`fxcompress.oplib.arith`);
teacher forced, the two differ at about one output code in 10^6 with int32 biases (26 M
conv outputs of mobilenet_v2; one in 10^3 with float biases), which deep networks amplify.

**QLinearConv** (MLAS ``MlasRequantizeOutput``): the int32 accumulator plus the int32 bias,
converted to float32, times one float32 multiplier per output channel
``(input_scale * weight_scale[c]) / output_scale`` (each step rounded to float32), clamped,
rounded half to even, plus the output zero point. The bias is the float bias on the
accumulator grid: ``round(bias / (input_scale * weight_scale[c]))`` (what the QDQ export
writes as its int32 ``DequantizeLinear`` input, :func:`bias_codes`). A ReLU or clamp after
the conv becomes a clamp of the output *codes* (:func:`code_bounds`): for a nondecreasing
quantization ``q(clamp(v, lo, hi)) == clamp(q(v), q(lo), q(hi))``, and the export writes it
as a ``Clip`` of the uint8 codes after ``QuantizeLinear`` (onnxruntime keeps the conv fused).

**QuantizeLinear**: ``round_half_even(x / scale) + zero_point``, clamped (a division, where
fxcompress's default multiplies by the float32 inverse of the scale).

**QLinearAdd** (MLAS's AVX2/AVX512 kernel): with ``ra = a_scale / out_scale`` and
``rb = b_scale / out_scale`` (float32) and the constant
``k = out_zp - fma(ra, a_zp, rb * b_zp)``, the output is
``round_half_even(fma(a, ra, fma(b, rb, k)))`` clamped, ``a`` and ``b`` the raw codes. The
output is a function of two bytes, so it is tabulated once per qparams for all 65536 code
pairs, the fused multiply-adds computed in float64 from exact products and rounded once to
float32. Measured equal to onnxruntime 1.32 on 7.5 M random same-shape codes (AMD EPYC,
AVX512-VNNI); onnxruntime selects its add kernel by ISA (a fixed-point one on some CPUs) and
takes other steps for a broadcast scalar operand, where the two may differ at about one
output in 10^6.

**QLinearMul** (MLAS's SSE2 kernel, every x86 ISA): ``P = (a - a_zp) * (b - b_zp)`` exact,
``fl(fl(P * r) + out_zp)`` with ``r = fl(fl(a_scale * b_scale) / out_scale)``, rounded half to
even and saturated: the zero point is added *before* the rounding, so a value a hair past a
half on one side lands on the other (measured equal to onnxruntime 1.32 on 24 M broadcast
products over 140 random qparams sets, where adding the zero point after rounding missed 90).
Tabulated per qparams like QLinearAdd.

**QLinearGlobalAveragePool** (MLAS, x86): the exact int32 sum of each channel minus
``in_zp * H * W``, times ``fl(in_scale / fl(out_scale * H * W))``, rounded half to even, plus
the output zero point, saturated.

Exactness bound: the conv's ``acc + bias`` is exact in float32 below 2**24 (no 8-bit conv of
at most 514 products per output reaches it; mobilenet_v2's largest on four
photos is about 2**18); above it the oneDNN kernel rounds the accumulator before adding the
bias, onnxruntime after.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch

from fxcompress.oplib.arith import lookup_code_pairs
from fxcompress.oplib.errors import fail

__all__ = ["bias_codes", "qlinearconv_multiplier", "code_bounds", "requantize_accumulator",
           "quantize_linear_uint8", "qlinear_add_uint8", "qlinear_mul_uint8", "qlinear_global_average_pool_uint8",
           "CLAMP_POST_OPS"]

#: The conv post-ops onnxruntime's fused QLinearConv can express (as a clamp of its codes).
CLAMP_POST_OPS = ("none", "relu", "hardtanh")

# 1.5 * 2**23: adding it to a float32 in [-2**22, 2**22] rounds it half to even (the constant
# is even) and leaves the integer in the low mantissa bits, as MLAS rounds; adding the zero
# point after that is exact, so the low byte of the int32 view is the uint8 code.
_MAGIC = 12582912.0


def bias_codes(bias: torch.Tensor, input_scale: torch.Tensor | float, weight_scale: torch.Tensor) -> torch.Tensor:
    """The int32 bias on the accumulator grid: ``round(bias / (input_scale * weight_scale))``,
    the product rounded to float32 (what a QDQ file's bias ``DequantizeLinear`` holds).
    A code beyond int32 raises: clamping it would silently change the layer (and
    onnxruntime's int32 sum with the accumulator wraps around); ``fold_fake_quant`` widens
    the weight scale of such channels, so a layer it folded always fits."""
    grid = torch.as_tensor(input_scale, dtype=torch.float32) * weight_scale.float()
    codes = torch.round(bias.detach().float() / grid)
    too_large = codes.abs() > 2 ** 31 - 1
    if bool(too_large.any()):
        channels = too_large.reshape(-1).nonzero().reshape(-1).tolist()
        fail("config", f"the bias of output channel(s) {channels[:8]} does not fit int32 on the accumulator "
                       f"grid (|bias / (input_scale * weight_scale)| up to {float(codes.abs().max()):.3g} > 2**31 - 1): "
                       f"their weight scale is too small for their bias; fold the model with fold_fake_quant "
                       f"(which widens such weight scales) or raise those weight scales")
    return codes.to(torch.int32)


def qlinearconv_multiplier(input_scale: float, weight_scale: torch.Tensor, output_scale: float) -> torch.Tensor:
    """QLinearConv's float32 requantization multiplier per output channel:
    ``(input_scale * weight_scale[c]) / output_scale``, each step rounded to float32."""
    x = torch.tensor(input_scale, dtype=torch.float32)
    return (x * weight_scale.float()) / torch.tensor(output_scale, dtype=torch.float32)


def _code(value: float, scale: float, zero_point: int) -> int:
    q = torch.round(torch.tensor(value, dtype=torch.float32) / torch.tensor(scale, dtype=torch.float32))
    return int(min(max(float(q) + zero_point, 0.0), 255.0))


def code_bounds(post_op: str, post_op_args: Sequence[float], scale: float, zero_point: int) -> tuple[int, int]:
    """The ``[low, high]`` codes a clamp-like post-op leaves (``(0, 255)`` for none): the codes
    of its bounds, quantized as :func:`quantize_linear_uint8` does."""
    if post_op == "none":
        return 0, 255
    if post_op == "relu":
        return zero_point, 255
    if post_op == "hardtanh":
        low, high = (float(a) for a in post_op_args)
        return _code(low, scale, zero_point), _code(high, scale, zero_point)
    raise ValueError(f"post-op {post_op!r} is not a clamp; onnxruntime's QLinearConv takes {CLAMP_POST_OPS}")


def _round_to_codes(t: torch.Tensor, zero_point: int, low: int, high: int) -> torch.Tensor:
    """``clamp(round_half_even(t) + zero_point, low, high)`` as uint8 in ``t``'s memory format
    (``t`` float32, overwritten)."""
    t.clamp_(float(low - zero_point), float(high - zero_point)).add_(_MAGIC)
    if zero_point:
        t.add_(float(zero_point))
    return t.view(torch.int32).to(torch.uint8)


def requantize_accumulator(y: torch.Tensor, multiplier: torch.Tensor, zero_point: int, low: int = 0,
                           high: int = 255) -> torch.Tensor:
    """QLinearConv's requantization of ``y`` (float32 holding ``acc + bias``, channels along
    dim 1; overwritten): ``clamp(round_half_even(y * multiplier[c]) + zero_point, low, high)``,
    uint8 in ``y``'s memory format. (Measured, 1 thread: cache-sized chunks were slower than one
    pass per op.)"""
    shape = [1] * y.dim()
    shape[1] = -1
    return _round_to_codes(y.mul_(multiplier.view(shape)), zero_point, low, high)


def quantize_linear_uint8(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """ONNX ``QuantizeLinear`` to uint8: ``clamp(round_half_even(x / scale) + zero_point, 0, 255)``,
    in ``x``'s memory format (float32 division, as onnxruntime computes it)."""
    t = torch.div(x.detach().float(), torch.tensor(scale, dtype=torch.float32))
    return _round_to_codes(t, zero_point, 0, 255)


@functools.lru_cache(maxsize=256)
def _add_table(a_scale: float, a_zero_point: int, b_scale: float, b_zero_point: int, output_scale: float,
               output_zero_point: int, low: int) -> torch.Tensor:
    """QLinearAdd's output for every pair of codes, ``table[a * 256 + b]`` (64 KB, uint8)."""
    f32 = torch.float32
    ra = float(torch.tensor(a_scale, dtype=f32) / torch.tensor(output_scale, dtype=f32))
    rb = float(torch.tensor(b_scale, dtype=f32) / torch.tensor(output_scale, dtype=f32))
    inner = torch.tensor(ra * a_zero_point + float(torch.tensor(rb * b_zero_point, dtype=f32)), dtype=f32)
    k = float(torch.tensor(float(output_zero_point) - float(inner), dtype=f32))
    codes = torch.arange(256, dtype=torch.float64)
    # The products of 8-bit codes and float32 ratios are exact in float64: each fma is one rounding.
    t = (codes * rb + k).to(f32).to(torch.float64)                  # fma(b, rb, k), by b
    t = (codes.view(256, 1) * ra + t.view(1, 256)).to(f32)          # fma(a, ra, .), by (a, b)
    with torch.inference_mode(False):  # a normal tensor, usable in and out of inference mode
        return _round_to_codes(t, 0, low, 255).reshape(-1).clone()


def qlinear_add_uint8(a: torch.Tensor, b: torch.Tensor, a_scale: float, a_zero_point: int, b_scale: float,
                      b_zero_point: int, output_scale: float, output_zero_point: int,
                      low: int = 0) -> torch.Tensor:
    """onnxruntime's ``QLinearAdd`` of uint8 codes (see the module docstring), clamped to
    ``[low, 255]`` (``low`` the code of 0.0 for an add followed by a ReLU): a lookup in the
    table of all 65536 code pairs, computed once per qparams (the output is a function of
    two bytes; a lookup costs a tenth of the float64 arithmetic on large tensors). Keeps a
    4-D channels-last layout."""
    table = _add_table(a_scale, a_zero_point, b_scale, b_zero_point, output_scale, output_zero_point, low)
    return lookup_code_pairs(table, a, b)


@functools.lru_cache(maxsize=256)
def _mul_table(a_scale: float, a_zero_point: int, b_scale: float, b_zero_point: int, output_scale: float,
               output_zero_point: int) -> torch.Tensor:
    """QLinearMul's output for every pair of codes, ``table[a * 256 + b]`` (64 KB, uint8)."""
    f32, f64 = torch.float32, torch.float64
    ratio = float(torch.tensor(a_scale, dtype=f32) * torch.tensor(b_scale, dtype=f32)
                  / torch.tensor(output_scale, dtype=f32))
    codes = torch.arange(256, dtype=f64)
    product = (codes - a_zero_point).view(256, 1) * (codes - b_zero_point).view(1, 256)  # exact integers
    # Both steps exact in float64, then rounded once to float32, as MLAS's float32 ops round.
    t = ((product * ratio).to(f32).to(f64) + output_zero_point).to(f32)
    with torch.inference_mode(False):
        return torch.round(t).clamp_(0, 255).to(torch.uint8).reshape(-1).clone()


def qlinear_mul_uint8(a: torch.Tensor, b: torch.Tensor, a_scale: float, a_zero_point: int, b_scale: float,
                      b_zero_point: int, output_scale: float, output_zero_point: int) -> torch.Tensor:
    """onnxruntime's ``QLinearMul`` of uint8 codes (broadcast), as MLAS computes it on x86 for
    every ISA: ``sat(round_half_even(fl(fl(P * r) + zero_point)))`` with ``P = (a - za)(b - zb)``
    exact and ``r = fl(fl(sa * sb) / so)``; the zero point is added in float32 before the
    rounding. Looked up in the table of all 65536 code pairs."""
    table = _mul_table(a_scale, a_zero_point, b_scale, b_zero_point, output_scale, output_zero_point)
    return lookup_code_pairs(table, a, b)


def qlinear_global_average_pool_uint8(x: torch.Tensor, input_scale: float, input_zero_point: int,
                                      output_scale: float, output_zero_point: int) -> torch.Tensor:
    """onnxruntime's ``QLinearGlobalAveragePool`` of ``(N, C, H, W)`` uint8 codes: the exact int32
    sum of each channel minus ``zero_point * H * W``, times ``fl(input_scale / fl(output_scale *
    H * W))`` in float32, rounded half to even, plus the output zero point; ``(N, C, 1, 1)``
    channels-last."""
    n = x.shape[2] * x.shape[3]
    f32 = torch.float32
    multiplier = torch.tensor(input_scale, dtype=f32) / (torch.tensor(output_scale, dtype=f32)
                                                         * torch.tensor(float(n), dtype=f32))
    sums = x.sum(dim=(2, 3), keepdim=True, dtype=torch.int32) - input_zero_point * n
    y = sums.to(f32).mul_(multiplier)
    return _round_to_codes(y, output_zero_point, 0, 255).contiguous(memory_format=torch.channels_last)
