"""The arithmetic of the int8 kernels with portable torch ops, and the uint8 activation helpers.

This is the reference every kernel path is held to and the glue between kernels; it runs
on any CPU with plain torch ops (the one exception: :func:`max_pool2d_uint8` takes ATen's
``quantized::max_pool2d`` where this build registers it for plain uint8 tensors).

**Integer layers.** oneDNN's x86 int8 conv and linear (``torch.ops.onednn.qconv_pointwise``
/ ``qlinear_pointwise``) accumulate ``(x_code - x_zp) * w_code`` exactly in int32, then
finish in float32, every step rounded to float32:

1. ``y = float(acc) * input_scale * weight_scale[c] + bias[c]`` (:func:`rescale`);
2. a fused residual (``sum``) adds ``(r - r_zp) * r_scale`` with one rounding
   (:func:`add_dequantized`);
3. the post-op; then requantization as :func:`quantize_uint8`.

Measured bit for bit on torch 2.14.1 with AVX512-VNNI (AMD EPYC) over every conv of
resnet50, mobilenet_v2 and efficientnet_b0 at 224 px; other operation orders (one
combined scale, a fused multiply-add of the bias, division by the output scale) each
differ at a few codes in 10^7. Other kernel paths round some float32 steps differently
(Intel AMX: the fused residual ``sum`` and some 3-channel first convs, about 1 output in
10^4), which is why the x86 lowering is held to one code per op, not to equality
(``fxcompress.quant.contract``). The accumulation here is a float64 conv/linear of
integer values: every product and partial sum is an integer below 2**53, hence exact
whatever algorithm torch picks (float32 accumulation is not: its rounding depends on the
algorithm and the memory format, and lands one code off at rounding ties).

**uint8 activations** are affine per tensor: ``q = clamp(round(x * (1 / scale) + zp), 0, 255)``,
each step rounded to float32, the last half to even (the order of oneDNN's
requantization), ``x ~= (q - zp) * scale``: bit for bit what
``fxcompress.quant.qparams.quantize`` (and so the fake-quant graph) computes. Dynamic int8
per token has one scale per row and one zero point for all rows
(:func:`quantize_per_token_uint8`).

Measured here (torch 2.14.1, 1 thread, resnet's stem pool 64x112x112): aten's uint8
``max_pool2d`` raises on channels-last input and takes 6-9 ms on NCHW; the k*k views
version 2.5-3x torch.ao's time; ``quantized::max_pool2d`` on plain uint8 the same as
torch.ao's (35 us unloaded). ``quantize_uint8`` costs 1.5-3x torch.ao's fused per-tensor
quantize (which needs a quantized dtype): four aten passes instead of one fused kernel.
"""

from __future__ import annotations

import functools
import math
import threading
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from fxcompress.oplib.errors import fail

__all__ = [
    "accumulate",
    "rescale",
    "add_dequantized",
    "lookup",
    "lookup_code_pairs",
    "mul_uint8",
    "mul_code_table",
    "quantize_uint8",
    "quantize_product_uint8",
    "dequantize_uint8",
    "requantize_uint8",
    "choose_qparams_uint8",
    "quantize_per_token_uint8",
    "apply_post_op",
    "POST_OP_NAMES",
    "supports_uint8_max_pool2d",
    "max_pool2d_uint8",
    "unpack_unsigned",
]

def accumulate(compute: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], codes: torch.Tensor,
               weight: torch.Tensor) -> torch.Tensor:
    """``compute(codes, weight)`` exactly, as float64 holding integers.

    ``codes`` are the input's integer values minus its zero point (any dtype holding
    integers), ``weight`` the integer weight (minus its zero point); ``compute`` is the
    layer's linear map (``F.conv2d`` with the layer's geometry, ``F.linear``, ...).
    """
    return compute(codes.to(torch.float64), weight.to(torch.float64))


def rescale(acc: torch.Tensor, input_scale: float | torch.Tensor, weight_scale: torch.Tensor,
            bias: torch.Tensor | None, channel_dim: int) -> torch.Tensor:
    """``float(acc) * input_scale * weight_scale[c] + bias[c]`` in float32, step by step.

    ``weight_scale`` has one value per channel along ``channel_dim`` of ``acc`` (or is
    a scalar); ``bias`` likewise (or None).
    """
    shape = [1] * acc.dim()
    shape[channel_dim] = -1
    y = acc.to(torch.float32).mul_(torch.as_tensor(input_scale, dtype=torch.float32))
    w_scale = weight_scale.to(torch.float32)
    y.mul_(w_scale.view(shape) if w_scale.dim() else w_scale)
    if bias is not None:
        y.add_(bias.to(torch.float32).view(shape))
    return y


def add_dequantized(y: torch.Tensor, r: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """``y + (r - zero_point) * scale`` rounded once to float32 (a fused multiply-add).

    ``r`` holds integer codes. In float64 the product is exact and the sum is rounded
    once before the final rounding to float32.
    """
    return (y.to(torch.float64) + (r.to(torch.float64) - zero_point) * scale).to(torch.float32)


# Adding 2**23 to a float32 in [0, 2**23) rounds it to an integer (half to even, like
# torch.round) and leaves that integer in the low mantissa bits, so after clamping the
# low byte of the int32 view *is* the uint8 code. This replaces round + a float->uint8
# conversion, which aten does not vectorise (3-4x slower than int32->uint8 here).
# The zero point is added first, on its own, so that ``x * inv + zp`` is rounded to
# float32 before it is rounded to an integer, as the kernels and qparams.quantize do.
_MAGIC = float(1 << 23)
# Large inputs are quantized in chunks through a cache-sized scratch buffer (``_scratch``, one
# per thread, reused across calls): one full float temporary of a batch-32 image batch (19 MB)
# cost more in page faults than the math.
_CHUNK = 1 << 18

_THREAD = threading.local()


def _scratch(numel: int) -> torch.Tensor:
    """A float32 buffer of at least ``numel`` values, this thread's own (reused across calls)."""
    buf = getattr(_THREAD, "scratch", None)
    if buf is None or buf.numel() < numel:
        with torch.inference_mode(False):  # usable in and out of inference mode
            buf = _THREAD.scratch = torch.empty(max(numel, _CHUNK), dtype=torch.float32)
    return buf


@functools.lru_cache(maxsize=4096)
def _scalar(value: float) -> torch.Tensor:
    """``value`` as a 0-dim float32 tensor (memoised). An elementwise op given a Python number
    wraps it into a tensor on every call (a few microseconds, hundreds of times a forward);
    the value is float32-exact here, so the result is the same bit for bit."""
    with torch.inference_mode(False):  # a normal tensor, usable in and out of inference mode
        return torch.tensor(value, dtype=torch.float32)


_BOUNDS = (float(1 << 23), float((1 << 23) + 255))


@functools.lru_cache(maxsize=4096)
def _inverse(scale: float) -> float:
    """``1 / scale`` rounded to float32, as the kernels compute it (memoised: a tensor
    round trip costs more than a small quantize)."""
    return float(torch.tensor(scale, dtype=torch.float32).reciprocal())


def _round_clamp_(y: torch.Tensor, zero_point: int) -> torch.Tensor:
    """``y + zero_point``, then rounded and clamped to [0, 255] through the magic number, in place."""
    lo, hi = _BOUNDS
    # The bounds go in as Python numbers (clamp's Scalar overload, no tensor is made): with
    # 0-dim tensor bounds aten takes its three-tensor clamp, measured 16x slower (190 vs
    # 12 us per 2**18 values, 1 thread), which made quantize the slowest op of a lowered
    # MiniLM.
    return y.add_(_scalar(float(zero_point))).add_(_scalar(_MAGIC)).clamp_(lo, hi)


def _quantize_flat(x: torch.Tensor, out: torch.Tensor, inverse: float, zero_point: int,
                   post_op: str, post_op_args: Sequence[float]) -> None:
    scratch = _scratch(min(_CHUNK, x.numel()))
    bits = scratch.view(torch.int32)
    for start in range(0, x.numel(), _CHUNK):
        stop = min(start + _CHUNK, x.numel())
        buf = scratch[: stop - start]
        # The activation runs chunk by chunk while the chunk is in cache (elementwise:
        # the same values as on the whole tensor), instead of in a pass of its own.
        torch.mul(apply_post_op(x[start:stop], post_op, post_op_args), _scalar(inverse), out=buf)
        _round_clamp_(buf, zero_point)
        out[start:stop].copy_(bits[: stop - start])


def quantize_uint8(x: torch.Tensor, scale: float, zero_point: int, post_op: str = "none",
                   post_op_args: Sequence[float] = ()) -> torch.Tensor:
    """Float tensor -> uint8 ``clamp(round(x * (1 / scale) + zero_point), 0, 255)``.

    Each step rounded to float32, the last half to even; bit for bit
    ``fxcompress.quant.qparams.quantize`` (hence the fake-quant graph) and the int8
    kernels' requantization for a float32 ``scale``. With ``post_op`` (a name of
    :func:`apply_post_op`) quantizes ``post_op(x)`` instead, computed with torch's own
    op. Keeps the memory format of a contiguous or channels-last input; computes in
    float32 whatever the input's float dtype.
    """
    x = x.detach()  # integer codes carry no gradient; the chunked path writes with out=
    if x.dtype != torch.float32:
        x = x.float()
    inverse = _inverse(scale)
    if x.numel() <= _CHUNK:
        y = apply_post_op(x, post_op, post_op_args).mul(_scalar(inverse))
        _round_clamp_(y, zero_point)
        return y.view(torch.int32).to(torch.uint8)
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        out = torch.empty(x.shape, dtype=torch.uint8, memory_format=torch.channels_last)
        _quantize_flat(x.permute(0, 2, 3, 1).reshape(-1), out.permute(0, 2, 3, 1).reshape(-1), inverse,
                       zero_point, post_op, post_op_args)
        return out
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.uint8)
    _quantize_flat(x.view(-1), out.view(-1), inverse, zero_point, post_op, post_op_args)
    return out


def quantize_product_uint8(x: torch.Tensor, gains: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """``quantize_uint8(x * gains)`` for a channels-last ``(N, C, H, W)`` ``x`` and ``(N, C, 1, 1)``
    gains (a squeeze-excitation gate), bit for bit, without the float product in memory.

    Image by image, a few rows of channels at a time: the product and its quantization
    run while the rows are in cache. Other shapes or layouts multiply, then quantize.
    """
    x, gains = x.detach(), gains.detach()
    n, c = x.shape[:2] if x.dim() == 4 else (0, 0)
    fused = (x.dim() == 4 and tuple(gains.shape) == (n, c, 1, 1) and x.dtype == gains.dtype == torch.float32
             and x.is_contiguous(memory_format=torch.channels_last) and x.numel() > 0)
    if not fused:
        return quantize_uint8(x * gains, scale, zero_point)
    inverse = _inverse(scale)
    h, w = x.shape[2:]
    rows = x.permute(0, 2, 3, 1).reshape(n, h * w, c)  # views: channels-last is (N, H, W, C) in memory
    out = torch.empty(x.shape, dtype=torch.uint8, memory_format=torch.channels_last)
    out_rows = out.permute(0, 2, 3, 1).reshape(n, h * w, c)
    gain_rows = gains.reshape(n, 1, c)
    step = max(1, _CHUNK // c)
    scratch = _scratch(min(step, h * w) * c)
    for i in range(n):
        for start in range(0, h * w, step):
            stop = min(start + step, h * w)
            buf = scratch[: (stop - start) * c].view(stop - start, c)
            torch.mul(rows[i, start:stop], gain_rows[i], out=buf)
            _round_clamp_(buf.mul_(_scalar(inverse)), zero_point)
            out_rows[i, start:stop].copy_(buf.view(torch.int32))
    return out


def dequantize_uint8(q: torch.Tensor, scale: float, zero_point: int,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 -> ``(q - zero_point) * scale`` in ``dtype``, keeping the memory format."""
    y = q.to(dtype)
    if dtype != torch.float32:
        return y.sub_(zero_point).mul_(scale)
    return y.sub_(_scalar(float(zero_point))).mul_(_scalar(float(scale)))


def requantize_uint8(y: torch.Tensor, scale: float | None, zero_point: int) -> torch.Tensor:
    """Quantize a float result to uint8, or return it as is when ``scale`` is None."""
    return y if scale is None else quantize_uint8(y, scale, zero_point)


def choose_qparams_uint8(x: torch.Tensor) -> tuple[float, int]:
    """Per-tensor asymmetric uint8 ``(scale, zero_point)`` covering ``[min(x, 0), max(x, 0)]``.

    The range always includes zero so that zero padding and ReLU zeros are exact. An
    all-zero tensor gets scale 1.0.
    """
    lo, hi = torch.aminmax(x.detach())
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = (hi - lo) / 255.0
    if not math.isfinite(scale):
        fail("kernel", f"cannot quantize a tensor with non-finite range {lo}..{hi}")
    if scale == 0.0:
        return 1.0, 0
    return scale, int(min(255, max(0, round(-lo / scale))))


def quantize_per_token_uint8(x: torch.Tensor, zero_point: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 codes per row (along the last dim) of a float32 tensor, every row around the same
    ``zero_point`` (1..254): ``(q, scale)``, ``scale`` of shape ``(*x.shape[:-1], 1)``.

    A row's scale is the smallest that gives its whole range, zero included, codes on both
    sides of ``zero_point``: ``scale = max(max(row, 0) / (255 - zp), -min(row, 0) / zp)``;
    ``q = round(x * (1 / scale)) + zp``, the product rounded to float32 and then half to
    even. No code is clipped, whatever the zero point, so it only sets how the 256 codes
    are shared between the negative and positive sides (128: about symmetric; small: rows
    that are mostly positive, as after GELU). An all-zero row has scale 1e-12, codes ``zp``.
    """
    if not 1 <= zero_point <= 254:
        fail("config", f"a per-token zero point must be in 1..254 (codes on both sides of it), got {zero_point}")
    x = x.detach()  # integer codes carry no gradient; the row blocks are written with out=
    # max(hi, 0) and min(lo, 0) need no clamps: a row's hi and -lo cannot both be negative,
    # and the larger, non-negative one is the scale.
    hi = x.amax(dim=-1, keepdim=True).mul_(_scalar(_inverse(float(255 - zero_point))))
    lo = x.amin(dim=-1, keepdim=True).mul_(_scalar(-_inverse(float(zero_point))))
    scale = torch.maximum(hi, lo).clamp_min_(_scalar(1e-12))
    # |x * (1 / scale)| stays within a few float32 ulps of the codes' reach (255 - zp above,
    # zp below), far from a half, so adding zp and the magic number (one exact add: both are
    # integers) rounds to a code in 0..255 without a clamp.
    k = x.shape[-1]
    rows, inverse = x.reshape(-1, k), scale.reciprocal().reshape(-1, 1)
    q = torch.empty(rows.shape, dtype=torch.uint8)
    # Row blocks of at most _CHUNK values through the thread's scratch buffer: a temporary as
    # large as x, allocated per call, cost more in page faults than the arithmetic (MiniLM's
    # 1050 x 384 linears, 1 thread: 0.70 -> 0.53 ms a call with glibc's allocator told to keep
    # freed memory, i.e. no faults).
    step = max(1, _CHUNK // k)
    scratch = _scratch(min(step, rows.shape[0]) * k)
    offset = _scalar(_MAGIC + zero_point)
    for start in range(0, rows.shape[0], step):
        stop = min(start + step, rows.shape[0])
        buf = scratch[: (stop - start) * k].view(stop - start, k)
        torch.mul(rows[start:stop], inverse[start:stop], out=buf).add_(offset)
        q[start:stop].copy_(buf.view(torch.int32))
    return q.view(x.shape), scale


_POST_OPS = {
    "relu": lambda y, a: F.relu(y),
    "hardswish": lambda y, a: F.hardswish(y),
    "hardtanh": lambda y, a: F.hardtanh(y, a[0], a[1]),
    "swish": lambda y, a: F.silu(y),
    "gelu": lambda y, a: F.gelu(y),
    "gelu_tanh": lambda y, a: F.gelu(y, approximate="tanh"),
    "tanh": lambda y, a: torch.tanh(y),
    "leaky_relu": lambda y, a: F.leaky_relu(y, a[0]),
    "sigmoid": lambda y, a: torch.sigmoid(y),  # no kernel fuses it; activation tables compute it
}
#: The post-op names :func:`apply_post_op` knows (besides ``none``).
POST_OP_NAMES = tuple(_POST_OPS)


def lookup(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[index]`` for an integer ``index`` of any shape, in its memory format (a 4-D
    channels-last index gives a channels-last result): one ``index_select`` over the index in
    memory order (measured 8x faster than advanced indexing here)."""
    if index.dtype not in (torch.int32, torch.int64):
        index = index.to(torch.int32)
    if index.dim() == 4 and index.is_contiguous(memory_format=torch.channels_last):
        nhwc = index.permute(0, 2, 3, 1)  # a contiguous view
        return table.index_select(0, nhwc.reshape(-1)).view(nhwc.shape).permute(0, 3, 1, 2)
    return table.index_select(0, index.reshape(-1)).view(index.shape)


def lookup_code_pairs(table: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``table[a * 256 + b]`` for uint8 codes ``a`` and ``b`` (broadcast): the output of a binary
    op of two bytes, looked up in the table of all 65536 pairs. Keeps a 4-D channels-last layout."""
    return lookup(table, torch.add(b, a.to(torch.int32), alpha=256))  # int32: a * 256 + b, broadcast


@functools.lru_cache(maxsize=256)
def mul_code_table(a_scale: float, a_zero_point: int, b_scale: float, b_zero_point: int, output_scale: float,
               output_zero_point: int) -> torch.Tensor:
    """``quantize_uint8(dequantize_uint8(a) * dequantize_uint8(b))`` for every pair of codes."""
    codes = torch.arange(256, dtype=torch.uint8)
    with torch.inference_mode(False):  # a normal tensor, usable in and out of inference mode
        product = (dequantize_uint8(codes, a_scale, a_zero_point).view(256, 1)
                   * dequantize_uint8(codes, b_scale, b_zero_point).view(1, 256))
        return quantize_uint8(product, output_scale, output_zero_point).reshape(-1).clone()


def mul_uint8(a: torch.Tensor, b: torch.Tensor, a_scale: float, a_zero_point: int, b_scale: float,
              b_zero_point: int, output_scale: float, output_zero_point: int) -> torch.Tensor:
    """``quantize_uint8(dequantize_uint8(a) * dequantize_uint8(b))`` of uint8 codes (broadcast):
    the folded graph's product of two quantized values, looked up by code pair."""
    table = mul_code_table(a_scale, a_zero_point, b_scale, b_zero_point, output_scale, output_zero_point)
    return lookup_code_pairs(table, a, b)


def apply_post_op(y: torch.Tensor, post_op: str, args: Sequence[float] = ()) -> torch.Tensor:
    """The float meaning of a fused post-op name (``none`` returns ``y`` unchanged)."""
    if post_op == "none":
        return y
    compute = _POST_OPS.get(post_op)
    if compute is None:
        fail("config", f"unknown post-op {post_op!r}; known: none, {', '.join(_POST_OPS)}")
    return compute(y, args)


@functools.lru_cache(maxsize=None)
def supports_uint8_max_pool2d() -> bool:
    """Whether ATen's ``quantized::max_pool2d`` has a kernel for plain uint8 CPU tensors."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("quantized::max_pool2d", "CPU")
    except RuntimeError:
        return False


def _valid_outputs(n_in: int, n_out: int, offset: int, stride: int) -> tuple[int, int]:
    """Range [lo, hi) of outputs o whose tap at input index ``o * stride + offset`` exists."""
    lo = max(0, -(offset // stride))  # ceil(-offset / stride)
    hi = min(n_out, (n_in - 1 - offset) // stride + 1)
    return lo, hi


def _pool_out(n: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    span = n + 2 * p - d * (k - 1) - 1
    out = (-(-span // s) if ceil_mode else span // s) + 1
    if ceil_mode and (out - 1) * s >= n + p:
        out -= 1  # torch: the last window must start inside the input or left padding
    return out


def _max_pool2d_views(x: torch.Tensor, k: Sequence[int], s: Sequence[int], p: Sequence[int],
                      d: Sequence[int], ceil_mode: bool) -> torch.Tensor:
    n, c, h, w = x.shape
    ho, wo = _pool_out(h, k[0], s[0], p[0], d[0], ceil_mode), _pool_out(w, k[1], s[1], p[1], d[1], ceil_mode)
    # Zero is uint8's minimum and every window holds at least one real element (torch
    # requires padding <= kernel/2), so a zero start is the identity of the max.
    out = torch.zeros((n, c, ho, wo), dtype=x.dtype).contiguous(memory_format=torch.channels_last)
    xh, oh = x.permute(0, 2, 3, 1), out.permute(0, 2, 3, 1)  # NHWC views: C innermost, vectorised
    for i in range(k[0]):
        off_h = i * d[0] - p[0]
        h_lo, h_hi = _valid_outputs(h, ho, off_h, s[0])
        for j in range(k[1]):
            off_w = j * d[1] - p[1]
            w_lo, w_hi = _valid_outputs(w, wo, off_w, s[1])
            if h_lo >= h_hi or w_lo >= w_hi:
                continue
            dst = oh[:, h_lo:h_hi, w_lo:w_hi]
            src = xh[:, h_lo * s[0] + off_h:(h_hi - 1) * s[0] + off_h + 1:s[0],
                     w_lo * s[1] + off_w:(w_hi - 1) * s[1] + off_w + 1:s[1]]
            torch.maximum(dst, src, out=dst)
    return out


def max_pool2d_uint8(x: torch.Tensor, kernel_size: Sequence[int], stride: Sequence[int],
                     padding: Sequence[int], dilation: Sequence[int] = (1, 1),
                     ceil_mode: bool = False, *, use_kernel: bool = True) -> torch.Tensor:
    """Exact 2-D max pool of a uint8 ``(N, C, H, W)`` tensor (qparams pass through unchanged).

    With ``use_kernel`` and :func:`supports_uint8_max_pool2d`, runs ATen's
    ``quantized::max_pool2d`` (fast on channels-last); otherwise the portable k*k
    ``torch.maximum`` version, which returns channels-last.
    """
    if x.dtype != torch.uint8 or x.dim() != 4:
        fail("kernel", f"max_pool2d_uint8 needs a 4-D uint8 tensor, got {x.dim()}-D {x.dtype}")
    k, s, p, d = list(kernel_size), list(stride), list(padding), list(dilation)
    if use_kernel and supports_uint8_max_pool2d():
        return torch.ops.quantized.max_pool2d.default(x, k, s, p, d, ceil_mode)
    return _max_pool2d_views(x, k, s, p, d, ceil_mode)


def unpack_unsigned(packed: torch.Tensor, bits: int, shape: Sequence[int]) -> torch.Tensor:
    """Unsigned ``bits``-bit codes of ``shape`` from ``packed`` (``8 // bits`` per byte, the
    first code in the lowest bits: ``fxcompress.quant.qparams.pack_int``'s layout)."""
    per = 8 // bits
    if per == 1:
        return packed.clone()
    shifts = torch.arange(per, dtype=torch.int16) * bits
    codes = (packed.to(torch.int16).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], -1)[..., : shape[-1]].to(torch.uint8)
