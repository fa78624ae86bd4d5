"""Kernel wrappers and uint8 helpers: numerics against the reference arithmetic, and the
precondition checks that must refuse (not crash on) inputs a kernel cannot take."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fxcompress.errors import ConfigError, LoweringError
from fxcompress.quant import isa
from fxcompress.quant import kernels as K
from fxcompress.quant import uint8 as U
from fxcompress.quant.qparams import quantize
from fxcompress.quant.spec import QuantSpec

ONEDNN = K.onednn_int8_support()
needs_onednn = pytest.mark.skipif(not ONEDNN, reason=f"oneDNN int8 unavailable: {ONEDNN.reason}")
# Most tests use 7-bit weights, which every x86 CPU's int8 kernels compute exactly
# (fxcompress.quant.isa); 8-bit weights are tested against this CPU's measured arithmetic.
PORTABLE_BITS = 7


def _activation(shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, float, int]:
    """A uint8 channels-last activation quantized from a ReLU-ish float tensor, with its qparams."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).add_(0.3).relu_()
    if len(shape) == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    scale, zp = U.choose_qparams_uint8(x)
    return U.quantize_uint8(x, scale, zp), scale, zp


def _weight(shape: tuple[int, ...], seed: int, bits: int = PORTABLE_BITS) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-channel integer weights of ``bits`` bits (codes in +-(2**(bits-1) - 1))."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) / (shape[1] * (shape[2] * shape[3] if len(shape) == 4 else 1)) ** 0.5
    qmax = 2 ** (bits - 1) - 1
    scale = w.flatten(1).abs().amax(1) / qmax
    q = torch.round(w / scale.view(-1, *[1] * (w.dim() - 1))).clamp(-qmax, qmax).to(torch.int8)
    return q, scale


def _deq_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.view(-1, *[1] * (q.dim() - 1))


def _out_qparams(y: torch.Tensor) -> tuple[float, int]:
    # A slightly wider range than the data: clipping post-ops (hardtanh) would otherwise put
    # every clipped value exactly on a rounding tie, where kernel and reference may differ.
    return U.choose_qparams_uint8(y * 1.03)


def _assert_close_codes(a: torch.Tensor, b: torch.Tensor) -> None:
    """uint8 codes equal to within one quantization step, and nearly all identical."""
    diff = (a.int() - b.int()).abs()
    assert diff.max().item() <= 1
    assert (diff == 0).float().mean().item() >= 0.99


@needs_onednn
@pytest.mark.parametrize("post_op,args", [("none", ()), ("relu", ()), ("hardswish", ()),
                                          ("hardtanh", (0.0, 6.0)), ("swish", ())])
def test_qconv_kernel_matches_reference_arithmetic(post_op: str, args: tuple[float, ...]) -> None:
    qx, xs, xzp = _activation((2, 16, 12, 12), seed=0)
    qw, ws = _weight((32, 16, 3, 3), seed=1)
    bias = torch.linspace(-0.5, 0.5, 32)
    y = U.apply_post_op(F.conv2d(U.dequantize_uint8(qx, xs, xzp), _deq_weight(qw, ws), bias, 1, 1), post_op, args)
    os_, ozp = _out_qparams(y)
    common = dict(input_shape=qx.shape, input_scale=xs, input_zero_point=xzp, stride=(1, 1),
                  padding=(1, 1), dilation=(1, 1), groups=1, post_op=post_op, post_op_args=args)
    out = K.QConvKernel(qw, ws, bias, output_scale=os_, output_zero_point=ozp, **common)(qx)
    assert out.dtype == torch.uint8 and out.is_contiguous(memory_format=torch.channels_last)
    _assert_close_codes(out, U.quantize_uint8(y, os_, ozp))
    out_f = K.QConvKernel(qw, ws, bias, **common)(qx)
    assert out_f.dtype == torch.float32
    torch.testing.assert_close(out_f, y, rtol=1e-4, atol=1e-4)


@needs_onednn
@pytest.mark.parametrize("groups,stride,dilation,kernel", [(1, 2, 1, 3), (4, 1, 2, 3), (16, 2, 1, 3), (1, 1, 1, 1)])
def test_qconv_kernel_grouped_strided_dilated(groups: int, stride: int, dilation: int, kernel: int) -> None:
    qx, xs, xzp = _activation((1, 16, 15, 15), seed=2)
    qw, ws = _weight((16, 16 // groups, kernel, kernel), seed=3)
    pad = dilation * (kernel // 2)
    y = F.conv2d(U.dequantize_uint8(qx, xs, xzp), _deq_weight(qw, ws), None, stride, pad, dilation, groups)
    os_, ozp = _out_qparams(y)
    kern = K.QConvKernel(qw, ws, None, input_shape=qx.shape, input_scale=xs, input_zero_point=xzp,
                         stride=(stride,) * 2, padding=(pad,) * 2, dilation=(dilation,) * 2,
                         groups=groups, output_scale=os_, output_zero_point=ozp)
    _assert_close_codes(kern(qx), U.quantize_uint8(y, os_, ozp))
    # An NCHW input is accepted too (the kernel converts it), with the same result.
    _assert_close_codes(kern(qx.contiguous()), U.quantize_uint8(y, os_, ozp))


@needs_onednn
def test_qconv_kernel_fused_sum_writes_into_accumulator() -> None:
    qx, xs, xzp = _activation((2, 8, 10, 10), seed=4)
    qw, ws = _weight((8, 8, 3, 3), seed=5)
    qr, rs, rzp = _activation((2, 8, 10, 10), seed=6)
    y = F.conv2d(U.dequantize_uint8(qx, xs, xzp), _deq_weight(qw, ws), None, 1, 1)
    y = F.relu(y + U.dequantize_uint8(qr, rs, rzp))
    os_, ozp = _out_qparams(y)
    kern = K.QConvKernel(qw, ws, None, input_shape=qx.shape, input_scale=xs, input_zero_point=xzp,
                         stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, post_op="relu",
                         output_scale=os_, output_zero_point=ozp, residual_scale=rs,
                         residual_zero_point=rzp)
    accum = qr.clone()
    out = kern.add_(qx, accum)
    _assert_close_codes(out, U.quantize_uint8(y, os_, ozp))
    assert torch.equal(accum, out)  # the kernel wrote its result into the accumulator
    with pytest.raises(LoweringError, match="without residual"):
        K.QConvKernel(qw, ws, None, input_shape=qx.shape, input_scale=xs, input_zero_point=xzp,
                      stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1).add_(qx, qr.clone())


@needs_onednn
def test_int8_arithmetic_is_measured_and_matches_the_isa() -> None:
    arithmetic = isa.int8_arithmetic()
    assert arithmetic.isa == isa.expected_isa()
    # VNNI and AMX multiply-accumulate in 32 bits; AVX2 and AVX512 without VNNI use 16-bit pairs.
    if arithmetic.isa in ("AVX2", "AVX512_CORE", "AVX", "SSE41"):
        assert not arithmetic.exact_products
    elif arithmetic.isa in ("AVX2_VNNI", "AVX512_CORE_VNNI", "AVX512_CORE_BF16", "AVX512_CORE_AMX"):
        assert arithmetic.exact_products
    assert arithmetic.isa in arithmetic.describe()


def test_pair_overflow_finds_the_worst_same_sign_pair() -> None:
    assert isa.pair_overflow(torch.tensor([[127, 1, -128, 0], [64, 64, -64, -64]], dtype=torch.int8)) is None
    assert isa.pair_overflow(torch.tensor([[127, 2, 5], [3, -100, -30]], dtype=torch.int8)) == (0, 127, 5)
    assert isa.pair_overflow(torch.tensor([[70, 58], [-65, -64]], dtype=torch.int8)) == (1, 65, 64)
    assert isa.pair_overflow(torch.tensor([[127], [-128]], dtype=torch.int8)) is None  # one weight: no pair
    q7, _ = _weight((64, 32, 3, 3), seed=20, bits=7)
    assert isa.pair_overflow(q7) is None  # 7-bit weights never overflow
    q8, _ = _weight((64, 32, 3, 3), seed=20, bits=8)
    assert isa.pair_overflow(q8) is not None


@needs_onednn
def test_8bit_weights_run_exactly_or_are_refused_by_this_cpus_arithmetic() -> None:
    qx, xs, xzp = _activation((1, 32, 9, 9), seed=21)
    qx = torch.full_like(qx, 255)  # the worst case for a saturating pair
    qw, ws = _weight((16, 32, 3, 3), seed=22, bits=8)
    geometry = dict(input_shape=qx.shape, input_scale=xs, input_zero_point=xzp, stride=(1, 1), padding=(1, 1),
                    dilation=(1, 1), groups=1)
    support = K.int8_weight_support(qw)
    if isa.int8_arithmetic().exact_products:
        assert support
        y = F.conv2d(U.dequantize_uint8(qx, xs, xzp), _deq_weight(qw, ws), None, 1, 1)
        torch.testing.assert_close(K.QConvKernel(qw, ws, None, **geometry)(qx), y, rtol=1e-4, atol=1e-4)
    else:
        assert not support and "overflow" in support.reason and "7 bits" in support.reason
        with pytest.raises(LoweringError, match="overflow"):
            K.QConvKernel(qw, ws, None, **geometry)
        with pytest.raises(LoweringError, match="overflow"):
            K.QLinearKernel(qw.flatten(1), ws, None)


def test_supports_qconv_explains_refusals() -> None:
    geometry = dict(stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1)
    if not ONEDNN:
        assert not K.supports_qconv((8, 4, 3, 3), (1, 4, 8, 8), **geometry)
        return
    assert K.supports_qconv((8, 4, 3, 3), (1, 4, 8, 8), **geometry)
    cases = {
        "channels": ((8, 4, 3, 3), (1, 5, 8, 8), {}),
        "too small": ((8, 4, 3, 3), (1, 4, 2, 2), {}),
        "gelu": ((8, 4, 3, 3), (1, 4, 8, 8), {"post_op": "gelu"}),
        "residual": ((8, 4, 3, 3), (1, 4, 8, 8), {"post_op": "hardswish", "residual": True}),
    }
    for needle, (w_shape, x_shape, extra) in cases.items():
        support = K.supports_qconv(w_shape, x_shape, **{**geometry, **extra})
        assert not support and needle in support.reason


@needs_onednn
def test_qconv_kernel_refuses_bad_arguments_before_calling() -> None:
    qw, ws = _weight((4, 4, 1, 1), seed=7)
    common = dict(input_shape=(1, 4, 4, 4), stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1)
    with pytest.raises(LoweringError, match="int8 weight"):
        K.QConvKernel(qw.float(), ws, None, input_scale=0.1, input_zero_point=0, **common)
    with pytest.raises(LoweringError, match="zero point"):
        K.QConvKernel(qw, ws, None, input_scale=0.1, input_zero_point=300, **common)
    with pytest.raises(LoweringError, match="takes 2 arguments"):
        K.QConvKernel(qw, ws, None, input_scale=0.1, input_zero_point=0, post_op="hardtanh", **common)


@needs_onednn
@pytest.mark.parametrize("post_op,args", [("none", ()), ("relu", ()), ("gelu", ()), ("gelu_tanh", ()),
                                          ("tanh", ()), ("leaky_relu", (0.1,)), ("hardtanh", (-1.0, 1.0))])
def test_qlinear_kernel_matches_reference_arithmetic(post_op: str, args: tuple[float, ...]) -> None:
    qx, xs, xzp = _activation((3, 5, 64), seed=8)
    qw, ws = _weight((48, 64), seed=9)
    bias = torch.linspace(-0.2, 0.2, 48)
    y = U.apply_post_op(F.linear(U.dequantize_uint8(qx, xs, xzp), _deq_weight(qw, ws), bias), post_op, args)
    os_, ozp = _out_qparams(y)
    out = K.QLinearKernel(qw, ws, bias, post_op=post_op, post_op_args=args, output_scale=os_,
                          output_zero_point=ozp)(qx, xs, xzp)
    assert out.shape == (3, 5, 48)
    _assert_close_codes(out, U.quantize_uint8(y, os_, ozp))
    out_f = K.QLinearKernel(qw, ws, bias, post_op=post_op, post_op_args=args)(qx, xs, xzp)
    torch.testing.assert_close(out_f, y, rtol=1e-4, atol=1e-4)


def test_int8pack_mm_refuses_the_shape_that_segfaults() -> None:
    # bf16 activations with K % 16 != 0 crash the process inside aten: must raise here.
    support = K.supports_int8pack_mm(100, torch.bfloat16)
    assert not support and "16" in support.reason
    with pytest.raises(LoweringError, match="in_features % 16"):
        K.int8pack_mm(torch.zeros(2, 100, dtype=torch.bfloat16), torch.zeros(8, 100, dtype=torch.int8),
                      torch.ones(8))
    assert not K.supports_int8pack_mm(256, torch.float32)  # runs, but ~40x slower than float
    qw, ws = _weight((32, 256), seed=11)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(12))
    y = K.int8pack_mm(x.bfloat16(), qw, ws).float()
    torch.testing.assert_close(y, x @ _deq_weight(qw, ws).t(), rtol=0.05, atol=0.05)


def test_int4pack_preconditions_and_result() -> None:
    assert not K.supports_int4pack_mm(24, 256, 64, torch.bfloat16)  # N % 16
    assert not K.supports_int4pack_mm(32, 256, 16, torch.bfloat16)  # group size
    assert not K.supports_int4pack_mm(32, 200, 64, torch.bfloat16)  # K % group
    assert not K.supports_int4pack_mm(32, 256, 64, torch.float32)   # slow path
    with pytest.raises(LoweringError, match="N % 16"):
        K.int4pack_weight(torch.zeros(24, 64, dtype=torch.uint8))
    g = torch.Generator().manual_seed(13)
    codes = torch.randint(0, 16, (32, 256), dtype=torch.uint8, generator=g)
    scale = torch.rand(32, 4, generator=g) * 0.1 + 0.01
    zp = torch.randint(0, 16, (32, 4), dtype=torch.uint8, generator=g)
    w = ((codes.float().view(32, 4, 64) - zp.float()[..., None]) * scale[..., None]).view(32, 256)
    x = torch.randn(5, 256, generator=g)
    y = K.int4pack_mm(x.bfloat16(), K.int4pack_weight(codes), 64, K.int4pack_scales_and_zeros(scale, zp))
    ref = x @ w.t()
    assert ((y.float() - ref).norm() / ref.norm()).item() < 1e-2
    with pytest.raises(LoweringError, match="bf16"):
        K.int4pack_mm(x, K.int4pack_weight(codes), 64, K.int4pack_scales_and_zeros(scale, zp))


def test_quantize_uint8_matches_the_fake_quant_arithmetic_bit_for_bit() -> None:
    spec = QuantSpec(bits=8, signed=False, symmetric=False, granularity="per_tensor")
    scale, zp = torch.tensor(0.02), torch.tensor(100, dtype=torch.int32)
    g = torch.Generator().manual_seed(14)
    for shape in [(2, 3, 20, 20), (4, 3, 160, 160), (300, 7)]:  # small and chunked paths
        x = torch.randn(shape, generator=g) * 3
        x.view(-1)[:200] = (torch.arange(200) - 100 + 0.5) * 0.02  # ties round half to even
        expected = quantize(x, scale, zp, spec)
        assert expected.dtype == torch.uint8
        assert torch.equal(U.quantize_uint8(x, float(scale), int(zp)), expected)
        if x.dim() == 4:
            q = U.quantize_uint8(x.contiguous(memory_format=torch.channels_last), float(scale), int(zp))
            assert q.is_contiguous(memory_format=torch.channels_last) and torch.equal(q, expected)
    assert U.quantize_uint8(torch.ones(3, dtype=torch.bfloat16), 0.5, 0).tolist() == [2, 2, 2]


def test_dequantize_and_qparams() -> None:
    x = torch.linspace(-1.0, 3.0, 1001)
    scale, zp = U.choose_qparams_uint8(x)
    assert 0 <= zp <= 255 and scale == pytest.approx(4.0 / 255)
    back = U.dequantize_uint8(U.quantize_uint8(x, scale, zp), scale, zp)
    assert (back - x).abs().max().item() <= scale / 2 + 1e-6
    assert U.choose_qparams_uint8(torch.zeros(4)) == (1.0, 0)
    assert U.choose_qparams_uint8(torch.tensor([0.5, 2.0]))[1] == 0  # range includes zero
    with pytest.raises(LoweringError, match="non-finite"):
        U.choose_qparams_uint8(torch.tensor([0.0, float("inf")]))


@pytest.mark.parametrize("zero_point", [1, 15, 128, 200, 254])
def test_quantize_per_token_uint8_covers_every_row(zero_point: int) -> None:
    x = torch.randn(7, 40, generator=torch.Generator().manual_seed(15))
    x[2] = 0.0
    x[3] = x[3].abs()  # no negatives
    x[4] = -x[4].abs() * 1e3  # no positives, a wide range
    q, s = U.quantize_per_token_uint8(x, zero_point)
    assert q.dtype == torch.uint8 and s.shape == (7, 1)
    assert q[2].eq(zero_point).all()  # an all-zero row: every code is the zero point
    rebuilt = (q.float() - zero_point) * s
    assert ((rebuilt - x).abs() <= s / 2 * (1 + 1e-5)).all()  # rounded, never clipped
    # each row reaches the end of its codes on the side that sets its scale
    reach = torch.where(x.amax(1) / (255 - zero_point) >= -x.amin(1) / zero_point, q.amax(1) == 255, q.amin(1) == 0)
    assert reach[[0, 1, 3, 4, 5, 6]].all()


@pytest.mark.parametrize("zero_point", [0, 255, -3])
def test_quantize_per_token_uint8_needs_codes_on_both_sides(zero_point: int) -> None:
    with pytest.raises(ConfigError, match="1..254"):
        U.quantize_per_token_uint8(torch.randn(2, 8), zero_point)


@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize("k,s,p,d,ceil", [(3, 2, 1, 1, False), (2, 2, 0, 1, False), (3, 1, 1, 1, False),
                                          (3, 2, 1, 1, True), (3, 2, 0, 2, False), (3, 2, 1, 1, False)])
def test_max_pool2d_uint8_is_exact(use_kernel: bool, k: int, s: int, p: int, d: int, ceil: bool) -> None:
    x = torch.randint(0, 256, (2, 8, 13, 11), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(16)).contiguous(memory_format=torch.channels_last)
    expected = F.max_pool2d(x.float(), k, s, p, d, ceil).to(torch.uint8)
    out = U.max_pool2d_uint8(x, (k, k), (s, s), (p, p), (d, d), ceil, use_kernel=use_kernel)
    assert torch.equal(out, expected)
    with pytest.raises(LoweringError, match="uint8"):
        U.max_pool2d_uint8(x.float(), (k, k), (s, s), (p, p))


def test_apply_post_op_rejects_unknown_names() -> None:
    y = torch.tensor([-1.0, 2.0, 7.0])
    assert U.apply_post_op(y, "hardtanh", (0.0, 6.0)).tolist() == [0.0, 2.0, 6.0]
    with pytest.raises(ConfigError, match="unknown post-op"):
        U.apply_post_op(y, "mish")
