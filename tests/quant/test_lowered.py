"""Lowered modules: x86 path within the contract of the reference path, fidelity vs float, and
copy/save/load safety.

The x86 modules are checked against their reference twins with the per-op contract of
:mod:`fxcompress.quant.contract` (codes within one, nearly all equal), never bit for bit:
kernel paths (AVX2, AVX512-VNNI, AMX) round differently. Weights are 7-bit where a test needs
the kernels to run, because 8-bit weights take the reference path on CPUs whose int8 dot
products saturate (:mod:`fxcompress.quant.isa`).
"""

from __future__ import annotations

import copy
import io
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import load_file, save_file
from sklearn.datasets import load_digits
from torch import nn

import fxcompress.oplib
from fxcompress.errors import ConfigError, InputError, LoweringError
from fxcompress.quant import uint8 as U
from fxcompress.quant.contract import CODE_TOLERANCE, reference_twin
from fxcompress.quant.kernels import onednn_int8_support
from fxcompress.quant.lowered import (
    Dequantize, DynamicQuantLinear, LoweredModule, QuantAdaptiveAvgPool2d, QuantAdd, QuantConv1d, QuantConv2d,
    QuantConv3d, QuantLinear, QuantMaxPool2d, Quantize, WeightOnlyLinear,
)

ONEDNN = onednn_int8_support()
needs_onednn = pytest.mark.skipif(not ONEDNN, reason=f"oneDNN int8 unavailable: {ONEDNN.reason}")
PLAIN_DTYPES = {torch.int8, torch.uint8, torch.float32, torch.int32, torch.int64}


def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    return (20 * torch.log10(ref.norm() / (ref - out).norm().clamp_min(1e-30))).item()


def digits_features(n: int, channels: int, size: int) -> torch.Tensor:
    """Real images (sklearn digits) mapped to a non-negative (n, channels, size, size) activation."""
    images = torch.tensor(load_digits().images[:n], dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    mix = torch.linspace(0.5, 1.5, channels).view(1, -1, 1, 1)
    shift = torch.linspace(-0.3, 0.3, channels).view(1, -1, 1, 1)
    return (images * mix + shift).relu_().contiguous(memory_format=torch.channels_last)


def quantized(x: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    scale, zp = U.choose_qparams_uint8(x)
    return U.quantize_uint8(x, scale, zp), scale, zp


def portable_scale(weight: torch.Tensor) -> torch.Tensor:
    """Symmetric per-output-channel scales for 7-bit codes (|q| <= 63): the weights every x86
    CPU's int8 kernels compute exactly."""
    return weight.detach().flatten(1).abs().amax(1) / 63


def assert_codes_close(a: torch.Tensor, b: torch.Tensor) -> None:
    """The per-op contract: codes within one, and (a sanity bound) nearly all identical."""
    diff = (a.int() - b.int()).abs()
    assert a.dtype == b.dtype == torch.uint8 and diff.max().item() <= CODE_TOLERANCE
    assert (diff == 0).float().mean().item() >= 0.99


def conv_module(post_op: str = "relu", groups: int = 1, stride: int = 1, dilation: int = 1,
                float_out: bool = False, residual: bool = False) -> tuple[QuantConv2d, torch.Tensor, nn.Conv2d]:
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3, stride, dilation, dilation, groups=groups)
    x = digits_features(4, 16, 12)
    qx, xs, xzp = quantized(x)
    y = U.apply_post_op(conv(x), post_op, (0.0, 6.0) if post_op == "hardtanh" else ())
    os_, ozp = U.choose_qparams_uint8(y * 1.03)
    ws = portable_scale(conv.weight)
    res = dict(residual=True, residual_scale=0.02, residual_zero_point=3) if residual else {}
    m = QuantConv2d.from_float(conv, ws, xs, xzp, None if float_out else os_, ozp, post_op=post_op,
                               post_op_args=(0.0, 6.0) if post_op == "hardtanh" else (), **res)
    return m, qx, conv


@needs_onednn
@pytest.mark.parametrize("post_op", ["none", "relu", "hardswish", "hardtanh", "swish"])
def test_conv_x86_equals_reference(post_op: str) -> None:
    m, qx, _ = conv_module(post_op)
    assert m.kernel_support(qx.shape)
    out = m(qx)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_codes_close(out, reference_twin(m)(qx))


@needs_onednn
@pytest.mark.parametrize("groups,stride,dilation", [(4, 1, 1), (16, 2, 1), (1, 2, 2)])
def test_conv_grouped_depthwise_strided(groups: int, stride: int, dilation: int) -> None:
    m, qx, _ = conv_module("relu", groups, stride, dilation)
    assert_codes_close(m(qx), reference_twin(m)(qx))


@pytest.mark.parametrize("backend", ["x86", "reference"])
def test_conv_float_output_matches_float_conv_with_quantized_weights(backend: str) -> None:
    m, qx, conv = conv_module("relu", float_out=True)
    m = reference_twin(m) if backend == "reference" else m
    xs, xzp = m.qparams("input")
    expected = F.relu(F.conv2d(U.dequantize_uint8(qx, xs, xzp), m.weight.float() * m.weight_scale.view(-1, 1, 1, 1),
                               conv.bias, 1, 1))
    out = m(qx)
    assert out.dtype == torch.float32 and sqnr(expected, out) >= 35


@pytest.mark.parametrize("backend", ["x86", "reference"])
@pytest.mark.parametrize("float_out", [False, True])
def test_conv_fused_residual(backend: str, float_out: bool) -> None:
    m, qx, _ = conv_module("relu", float_out=float_out, residual=True)
    m = reference_twin(m) if backend == "reference" else m
    r = (torch.randn(4, 32, 12, 12) if float_out else
         torch.randint(0, 256, (4, 32, 12, 12), dtype=torch.uint8)).contiguous(memory_format=torch.channels_last)
    r_before = r.clone()
    out = m(qx, r)
    assert torch.equal(r, r_before)  # not consumed: the module copied the residual
    xs, xzp = m.qparams("input")
    conv = F.conv2d(U.dequantize_uint8(qx, xs, xzp), m.weight.float() * m.weight_scale.view(-1, 1, 1, 1),
                    m.bias, 1, 1)
    if float_out:
        torch.testing.assert_close(out, F.relu(conv + r), rtol=1e-4, atol=1e-4)
    else:
        (rs, rzp), (os_, ozp) = m.qparams("residual"), m.qparams("output")
        assert_codes_close(out, U.quantize_uint8(F.relu(conv + U.dequantize_uint8(r, rs, rzp)), os_, ozp))
    with pytest.raises(InputError, match="residual"):
        m(qx)
    with pytest.raises(InputError, match="shape"):
        m(qx, r[:, :, :6])


@needs_onednn
def test_conv_consume_residual_writes_into_it() -> None:
    m, qx, _ = conv_module("relu", residual=True)
    m.consume_residual = True
    r = torch.randint(0, 256, (4, 32, 12, 12), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    expected = reference_twin(m)(qx, r)
    out = m(qx, r)
    assert_codes_close(out, expected)
    assert torch.equal(r, out)  # the caller promised nobody reads r afterwards


@pytest.mark.parametrize("conv", [
    nn.Conv1d(8, 12, 5, padding=2), nn.Conv1d(8, 8, 4, padding="same", padding_mode="reflect"),
    nn.Conv2d(8, 8, 9, padding="same", groups=8), nn.Conv2d(8, 16, 4, padding="same"),
    nn.Conv2d(8, 16, 3, padding=2, padding_mode="replicate", dilation=2),
    nn.Conv2d(8, 8, 3, padding=1, padding_mode="circular", groups=2),
    nn.Conv3d(8, 4, 3, padding=1), nn.Conv3d(8, 4, (1, 3, 2), stride=(1, 2, 1), padding="valid"),
], ids=lambda c: repr(c))
def test_every_conv_kind_and_padding_mode(conv: nn.Module) -> None:
    """1/2/3-D convs with every padding torch takes: the reference path equals the float conv of the
    dequantized values (padding applied to codes as the float conv pads values); x86 within a code."""
    torch.manual_seed(6)
    dims = len(conv.kernel_size)
    x = torch.rand((2, 8) + (11,) * dims) * 2
    qx, xs, xzp = quantized(x)
    w = conv.weight.detach()
    ws = portable_scale(w)
    deq_w = torch.round(w / ws.view(-1, *[1] * (w.dim() - 1))) * ws.view(-1, *[1] * (w.dim() - 1))
    twin = copy.deepcopy(conv)
    twin.weight.data = deq_w
    y = twin(U.dequantize_uint8(qx, xs, xzp)).detach()
    os_, ozp = U.choose_qparams_uint8(y * 1.03)
    cls = {1: QuantConv1d, 2: QuantConv2d, 3: QuantConv3d}[dims]
    m = cls.from_float(conv, ws, xs, xzp, os_, ozp)
    ref = reference_twin(m)
    assert (ref(qx).int() - U.quantize_uint8(y, os_, ozp).int()).abs().max().item() <= 1  # float conv rounding
    assert_codes_close(m(qx), ref(qx))
    m_f = cls.from_float(conv, ws, xs, xzp)
    torch.testing.assert_close(m_f(qx), y, rtol=1e-4, atol=1e-4)
    assert bool(m.kernel_support(qx.shape)) == bool(ONEDNN)


def test_conv_bad_input_and_config() -> None:
    m, qx, conv = conv_module()
    with pytest.raises(InputError, match="uint8"):
        m(qx.float())
    with pytest.raises(InputError, match="no fused residual"):
        m(qx, qx)
    with pytest.raises(ConfigError, match="residual"):
        QuantConv2d(4, 4, 3, post_op="hardswish", residual=True)
    with pytest.raises(ConfigError, match="post_op"):
        QuantConv2d(4, 4, 3, post_op="gelu")
    with pytest.raises(ConfigError, match="backend"):
        QuantConv2d(4, 4, 3, backend="arm")
    with pytest.raises(ConfigError, match="zero point"):
        QuantConv2d.from_float(conv, torch.ones(32), 0.1, 300)
    with pytest.raises(LoweringError, match="weight_scale"):
        QuantConv2d.from_float(conv, torch.ones(5), 0.1, 0)
    with pytest.raises(LoweringError, match="nn.Conv2d"):
        QuantConv2d.from_float(nn.ConvTranspose2d(4, 4, 3), torch.ones(4), 0.1, 0)
    with pytest.raises(LoweringError, match="nn.Conv2d"):
        QuantConv2d.from_float(nn.Conv1d(4, 4, 3), torch.ones(4), 0.1, 0)
    with pytest.raises(ConfigError, match="2-D convs only"):
        QuantConv1d(4, 4, 3, residual=True)
    reason = reference_twin(m).kernel_support(qx.shape)
    assert not reason and "reference" in reason.reason


@needs_onednn
def test_resnet18_basic_block_lowered_by_hand() -> None:
    """torchvision's BasicBlock with BN folded: conv+ReLU, then conv + fused residual + ReLU."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    for bn in (model.bn1, model.layer1[0].bn1, model.layer1[0].bn2):  # realistic BN statistics
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    block = model.layer1[0]
    images = digits_features(8, 3, 32)
    with torch.no_grad():
        x = model.maxpool(model.relu(model.bn1(model.conv1(images))))
        h = F.relu(block.bn1(block.conv1(x)))
        y = block(x)
    conv1, conv2 = fold_bn(block.conv1, block.bn1), fold_bn(block.conv2, block.bn2)
    qx, xs, xzp = quantized(x)
    (hs, hzp), (ys, yzp) = U.choose_qparams_uint8(h), U.choose_qparams_uint8(y)
    ws = [portable_scale(c.weight) for c in (conv1, conv2)]
    q1 = QuantConv2d.from_float(conv1, ws[0], xs, xzp, hs, hzp, post_op="relu")
    q2 = QuantConv2d.from_float(conv2, ws[1], hs, hzp, ys, yzp, post_op="relu", residual=True,
                                residual_scale=xs, residual_zero_point=xzp)
    out = q2(q1(qx), qx)
    assert_codes_close(out, reference_twin(q2)(reference_twin(q1)(qx), qx))
    assert sqnr(y, U.dequantize_uint8(out, ys, yzp)) >= 25


def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    fused = copy.deepcopy(conv)
    factor = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    fused.weight.data = conv.weight.detach() * factor.view(-1, 1, 1, 1)
    fused.bias = nn.Parameter(bn.bias.detach() - bn.running_mean * factor)
    return fused


@pytest.mark.parametrize("post_op,args", [("none", ()), ("relu", ()), ("gelu", ()), ("leaky_relu", (0.1,))])
@pytest.mark.parametrize("shape", [(6, 64), (2, 5, 64)])
def test_linear_x86_equals_reference(post_op: str, args: tuple[float, ...], shape: tuple[int, ...]) -> None:
    torch.manual_seed(1)
    lin = nn.Linear(64, 48)
    x = digits_features(shape[0], 1, 8).view(*shape) if len(shape) == 2 else digits_features(10, 1, 8).view(*shape)
    qx, xs, xzp = quantized(x)
    ws = portable_scale(lin.weight)
    os_, ozp = U.choose_qparams_uint8(U.apply_post_op(lin(x), post_op, args) * 1.03)
    m = QuantLinear.from_float(lin, ws, xs, xzp, os_, ozp, post_op=post_op, post_op_args=args)
    out = m(qx)
    assert out.shape == (*shape[:-1], 48)
    assert_codes_close(out, reference_twin(m)(qx))
    m_f = QuantLinear.from_float(lin, ws, xs, xzp, post_op=post_op, post_op_args=args)
    expected = U.apply_post_op(F.linear(U.dequantize_uint8(qx, xs, xzp), m_f.weight.float() * ws[:, None],
                                        lin.bias), post_op, args)
    assert sqnr(expected, m_f(qx)) >= 35
    with pytest.raises(InputError, match="features"):
        m(qx[..., :10])


@pytest.mark.parametrize("granularity", ["per_token", "per_tensor"])
def test_dynamic_linear(granularity: str) -> None:
    torch.manual_seed(2)
    lin = nn.Linear(64, 96)
    x = digits_features(12, 1, 8).view(3, 4, 64) - 0.3
    m = DynamicQuantLinear.from_float(lin, granularity=granularity)
    out = m(x)
    assert out.shape == (3, 4, 96) and out.dtype == torch.float32
    assert sqnr(lin(x).detach(), out) >= 30
    assert sqnr(reference_twin(m)(x), out) >= 60  # exact int32 vs float accumulation
    assert m(x.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(InputError, match="float"):
        m(x.to(torch.int32))
    with pytest.raises(ConfigError, match="granularity"):
        DynamicQuantLinear(4, 4, granularity="per_channel")


@pytest.mark.parametrize("bits,group", [(8, None), (8, 32), (4, 64), (4, 128), (2, 32)])
@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_weight_only_storage_and_output(bits: int, group: int | None, compute_dtype: str) -> None:
    torch.manual_seed(3)
    lin = nn.Linear(256, 64)
    m = WeightOnlyLinear.from_float(lin, bits, group, compute_dtype=compute_dtype)
    g = group or 256
    packed_cols = 256 if bits == 8 else 256 * bits // 8
    assert m.weight.shape == (64, packed_cols) and m.scale.shape == (64, 256 // g)
    w = m.dequantized_weight()
    step = m.scale.repeat_interleave(g, dim=1)
    assert ((w - lin.weight.detach()).abs() <= step / 2 + 1e-6).all()  # codes round to nearest
    x = digits_features(12, 1, 16).view(12, 256) - 0.2
    for rows in (x[:1], x):  # kernel path (few rows) and reference path
        expected = F.linear(rows, w, lin.bias)
        assert sqnr(expected, m(rows).detach()) >= (35 if compute_dtype == "bfloat16" else 80)


def test_weight_only_routes_unsafe_shapes_to_reference() -> None:
    torch.manual_seed(4)
    lin4 = nn.Linear(256, 24)  # N % 16 != 0: the int4 kernel cannot take it
    m4 = WeightOnlyLinear.from_float(lin4, 4, 64)
    support = m4.kernel_support(1)
    assert not support and "out_features % 16" in support.reason
    lin8 = nn.Linear(100, 32)  # K % 16 != 0 with bf16: int8pack_mm would segfault
    m8 = WeightOnlyLinear.from_float(lin8, 8, None)
    assert not m8.kernel_support(1)
    for m, lin in ((m4, lin4), (m8, lin8)):
        x = torch.randn(2, lin.in_features)
        assert sqnr(F.linear(x, m.dequantized_weight(), lin.bias), m(x).detach()) >= 35
    assert WeightOnlyLinear.from_float(nn.Linear(256, 32), 4, 64).kernel_support(1) or not ONEDNN
    assert not WeightOnlyLinear.from_float(nn.Linear(256, 32), 4, 64).kernel_support(1000)


def test_weight_only_bad_config() -> None:
    with pytest.raises(ConfigError, match="bits 8, 4 or 2"):
        WeightOnlyLinear(64, 64, bits=3)
    with pytest.raises(ConfigError, match="group_size"):
        WeightOnlyLinear(100, 64, group_size=64)
    with pytest.raises(ConfigError, match="compute_dtype"):
        WeightOnlyLinear(64, 64, compute_dtype="float16")
    assert WeightOnlyLinear(64, 64, group_size=128).group_size == 64  # longer than a row


def test_quantize_dequantize_modules() -> None:
    x = digits_features(2, 3, 8) - 0.5
    q, d = Quantize.from_qparams(0.01, 60), Dequantize.from_qparams(0.01, 60)
    codes = q(x)
    assert codes.dtype == torch.uint8 and codes.is_contiguous(memory_format=torch.channels_last)
    assert (d(codes) - x.clamp(-0.6, 1.95)).abs().max().item() <= 0.005 + 1e-6
    with pytest.raises(InputError, match="uint8"):
        d(x)
    with pytest.raises(ConfigError, match="scale"):
        Quantize.from_qparams(0.0, 0)


def test_uint8_pools_and_add() -> None:
    x = U.quantize_uint8(digits_features(4, 16, 14), 0.01, 5)
    pool = QuantMaxPool2d.from_float(nn.MaxPool2d(3, 2, 1))
    assert torch.equal(pool(x), F.max_pool2d(x.float(), 3, 2, 1).to(torch.uint8))
    assert torch.equal(reference_twin(pool)(x), pool(x))
    with pytest.raises(LoweringError, match="indices"):
        QuantMaxPool2d.from_float(nn.MaxPool2d(2, return_indices=True))
    for size in (1, 2, (7, 2), 3):  # 14 -> 3 has unequal windows: reference only
        gap = QuantAdaptiveAvgPool2d.from_float(nn.AdaptiveAvgPool2d(size), 0.01, 5, 0.008, 2)
        assert bool(gap.kernel_support(x.shape)) == (bool(ONEDNN) and size != 3)
        expected = U.quantize_uint8(F.adaptive_avg_pool2d(U.dequantize_uint8(x, 0.01, 5), size), 0.008, 2)
        assert (gap(x).int() - expected.int()).abs().max().item() <= 1
    b = U.quantize_uint8(digits_features(4, 16, 14).flip(0), 0.02, 100)
    b_before = b.clone()
    for relu in (False, True):
        add = QuantAdd.from_qparams((0.01, 5), (0.02, 100), (0.03, 40), relu=relu)
        y = U.dequantize_uint8(x, 0.01, 5) + U.dequantize_uint8(b, 0.02, 100)
        expected = U.quantize_uint8(y.relu() if relu else y, 0.03, 40)
        assert (add(x, b).int() - expected.int()).abs().max().item() <= 1
        assert torch.equal(add(x, b[:1]), reference_twin(add)(x, b[:1]))  # broadcast: reference
    assert torch.equal(b, b_before)


FACTORIES: dict[str, Callable[[], tuple[LoweredModule, tuple[torch.Tensor, ...]]]] = {
    "conv": lambda: (lambda m, qx, _: (m, (qx,)))(*conv_module()),
    "conv_residual": lambda: (lambda m, qx, _: (m, (qx, torch.randint(0, 256, (4, 32, 12, 12), dtype=torch.uint8)
                                                     .contiguous(memory_format=torch.channels_last))))(
        *conv_module(residual=True)),
    "linear": lambda: (QuantLinear.from_float(nn.Linear(64, 32), torch.full((32,), 0.002), 0.01, 3, 0.02, 7),
                       (torch.randint(0, 256, (5, 64), dtype=torch.uint8),)),
    "dynamic": lambda: (DynamicQuantLinear.from_float(nn.Linear(64, 32)), (torch.randn(5, 64),)),
    "weight_only4": lambda: (WeightOnlyLinear.from_float(nn.Linear(128, 32), 4, 64), (torch.randn(2, 128),)),
    "weight_only2": lambda: (WeightOnlyLinear.from_float(nn.Linear(128, 32), 2, 32), (torch.randn(40, 128),)),
    "gap": lambda: (QuantAdaptiveAvgPool2d.from_float(nn.AdaptiveAvgPool2d(1), 0.01, 5, 0.008, 2),
                    (torch.randint(0, 256, (2, 8, 7, 7), dtype=torch.uint8),)),
    "add": lambda: (QuantAdd.from_qparams((0.01, 5), (0.02, 100), (0.03, 40)),
                    (torch.randint(0, 256, (2, 8, 7, 7), dtype=torch.uint8),) * 2),
    "quantize": lambda: (Quantize.from_qparams(0.05, 128), (torch.randn(2, 3, 4, 4),)),
}


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_copy_save_load_give_identical_outputs(name: str, tmp_path) -> None:
    torch.manual_seed(5)
    m, inputs = FACTORIES[name]()
    expected = m(*[t.clone() for t in inputs])  # fills the cache (opaque packed weights on x86)
    state = m.state_dict()
    assert all(v.dtype in PLAIN_DTYPES and not v.is_mkldnn for v in state.values())
    copies = [copy.deepcopy(m), copy.copy(m)]
    buffer = io.BytesIO()
    torch.save(m, buffer)
    buffer.seek(0)
    copies.append(torch.load(buffer, weights_only=False))
    save_file(state, str(tmp_path / "m.safetensors"))
    rebuilt = type(m)(**m.config())
    rebuilt.load_state_dict(load_file(str(tmp_path / "m.safetensors")))
    copies.append(rebuilt)
    for other in copies:
        assert torch.equal(other(*[t.clone() for t in inputs]), expected)
    assert torch.equal(m(*[t.clone() for t in inputs]), expected)
    assert "backend=" in repr(m) and "bits=" in repr(m)


def test_load_state_dict_rebuilds_the_cache() -> None:
    m, qx, _ = conv_module()
    other, _, _ = conv_module("relu", float_out=False)
    with torch.no_grad():
        other.weight.neg_()
    before = m(qx)
    m.load_state_dict(other.state_dict())
    assert torch.equal(m(qx), other(qx)) and not torch.equal(m(qx), before)


def test_conv_cache_is_per_shape_and_bounded() -> None:
    m, _, _ = conv_module()
    twin = reference_twin(m)
    for size in range(6, 18):  # more input sizes than the cache keeps
        qx = U.quantize_uint8(digits_features(2, 16, size), 0.01, 0)
        assert_codes_close(m(qx), twin(qx))
    assert 0 < fxcompress.oplib.cache.entries(m.weight) <= fxcompress.oplib.cache.MAX_SHAPES


def test_qparam_scalars_are_reread_after_an_in_place_change() -> None:
    # The operators remember scale/zero-point scalars; load_state_dict (an in-place copy) must show.
    q = Quantize.from_qparams(0.1, 3)
    x = digits_features(2, 4, 6)
    before = q(x)
    with torch.no_grad():
        q.output_scale.fill_(0.2)
        q.output_zero_point.fill_(7)
    assert torch.equal(q(x), U.quantize_uint8(x, 0.2, 7)) and not torch.equal(q(x), before)
    assert fxcompress.oplib.cache.scalar(q.output_scale) == pytest.approx(0.2)
    with torch.inference_mode():
        frozen = torch.tensor(0.5)
    assert fxcompress.oplib.cache.scalar(frozen) == 0.5  # no version counter: read every time
