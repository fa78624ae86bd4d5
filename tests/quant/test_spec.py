"""QuantSpec validation and the qparams / (de)quantize / packing arithmetic."""

from __future__ import annotations

import json

import pytest
import torch

from fxcompress.errors import ConfigError
from fxcompress.quant import (
    QuantSpec,
    compute_qparams,
    default_activation_spec,
    default_weight_spec,
    dequantize,
    fake_quantize,
    kernel_scale,
    pack_int,
    quantize,
    unpack_int,
)


# ----------------------------------------------------------------- the spec


def test_defaults_are_what_x86_kernels_take() -> None:
    w = default_weight_spec()
    assert (w.bits, w.signed, w.symmetric, w.granularity, w.axis, w.observer) == (
        8, True, True, "per_channel", 0, "minmax")
    assert w.dtype == torch.int8
    a = default_activation_spec()
    assert (a.bits, a.signed, a.symmetric, a.granularity, a.observer) == (
        8, False, False, "per_tensor", "histogram")
    assert a.dtype == torch.uint8


@pytest.mark.parametrize("bits, signed, qmin, qmax", [
    (8, True, -128, 127), (8, False, 0, 255), (4, True, -8, 7), (4, False, 0, 15),
    (2, True, -2, 1), (2, False, 0, 3), (3, True, -4, 3),
])
def test_integer_range(bits: int, signed: bool, qmin: int, qmax: int) -> None:
    spec = QuantSpec(bits=bits, signed=signed)
    assert (spec.qmin, spec.qmax) == (qmin, qmax)


@pytest.mark.parametrize("changes, field", [
    ({"bits": 1}, "bits"),
    ({"bits": 9}, "bits"),
    ({"bits": True}, "bits"),
    ({"bits": 8.0}, "bits"),
    ({"signed": 1}, "signed"),
    ({"granularity": "per_row"}, "granularity"),
    ({"granularity": "per_group"}, "group_size"),
    ({"granularity": "per_group", "group_size": 0}, "group_size"),
    ({"granularity": "per_channel", "group_size": 32}, "group_size"),
    ({"axis": 0.5}, "axis"),
    ({"observer": "kl"}, "observer"),
    ({"observer": "histogram", "granularity": "per_channel"}, "observer"),
    ({"observer": "percentile", "granularity": "per_group", "group_size": 8}, "observer"),
    ({"averaging_constant": 0.0}, "averaging_constant"),
    ({"percentile": 40.0}, "percentile"),
    ({"bins": 8}, "bins"),
])
def test_invalid_specs_name_the_field(changes: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=rf"QuantSpec\.{field}="):
        QuantSpec(**changes)


def test_replace_validates() -> None:
    with pytest.raises(ConfigError, match="bits"):
        default_weight_spec().replace(bits=12)


@pytest.mark.parametrize("spec", [
    default_weight_spec(),
    default_activation_spec(),
    QuantSpec(bits=4, granularity="per_group", group_size=32, observer="mse"),
])
def test_dict_round_trip(spec: QuantSpec) -> None:
    data = json.loads(json.dumps(spec.to_dict()))
    assert QuantSpec.from_dict(data) == spec


def test_from_dict_rejects_unknown_keys() -> None:
    with pytest.raises(ConfigError, match="nbits"):
        QuantSpec.from_dict({"nbits": 4})


# ----------------------------------------------------------------- qparams


def test_affine_qparams_closed_form() -> None:
    spec = QuantSpec(signed=False, symmetric=False)
    scale, zp = compute_qparams(-1.0, 3.0, spec)
    assert scale.dtype == torch.float32 and zp.dtype == torch.int32
    assert torch.equal(scale, kernel_scale(torch.tensor(4.0 / 255)))
    assert int(zp) == 64  # 0 - round(-1 / (4/255)) = round(63.75)


def test_kernel_scales_make_every_dequantized_code_exact() -> None:
    raw = torch.rand(2000) * 10 ** torch.randint(-6, 3, (2000,)).float() + 1e-7
    scale = kernel_scale(raw)
    mantissa, _ = torch.frexp(scale)
    assert torch.equal(mantissa * 65536, torch.round(mantissa * 65536))  # 16 significant bits
    assert bool((scale >= raw).all()) and bool(((scale - raw) / raw < 2.0 ** -15).all())
    codes = torch.arange(-255, 256, dtype=torch.float32)
    products = codes[:, None] * scale[None, :]  # (q - zp) * scale for every 8-bit difference
    assert torch.equal(products.double(), codes.double()[:, None] * scale.double()[None, :])


def test_symmetric_qparams_closed_form() -> None:
    signed = QuantSpec(signed=True, symmetric=True)
    scale, zp = compute_qparams(-2.0, 1.0, signed)
    assert torch.equal(scale, kernel_scale(torch.tensor(2.0 / 127.5))) and int(zp) == 0
    unsigned = QuantSpec(signed=False, symmetric=True)
    scale_u, zp_u = compute_qparams(-2.0, 1.0, unsigned)
    assert torch.equal(scale_u, scale) and int(zp_u) == 128


def test_range_always_contains_zero_and_scale_is_positive() -> None:
    spec = QuantSpec(signed=False, symmetric=False)
    scale, zp = compute_qparams(1.0, 3.0, spec)
    assert torch.equal(scale, kernel_scale(torch.tensor(3.0 / 255))) and int(zp) == 0
    scale, zp = compute_qparams(-3.0, -1.0, spec)
    assert int(zp) == 255
    scale, _ = compute_qparams(0.0, 0.0, spec)
    assert float(scale) == torch.finfo(torch.float32).eps


def test_per_channel_qparams_are_elementwise() -> None:
    spec = default_weight_spec()
    lo, hi = torch.tensor([-1.0, -4.0, 0.0]), torch.tensor([2.0, 1.0, 0.5])
    scale, zp = compute_qparams(lo, hi, spec)
    assert torch.equal(scale, kernel_scale(torch.tensor([2.0, 4.0, 0.5]) / 127.5))
    assert torch.equal(zp, torch.zeros(3, dtype=torch.int32))


# ----------------------------------------------------------------- (de)quantize


def _check_error_bound(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor,
                       zp: torch.Tensor, scale_b: torch.Tensor) -> None:
    q = quantize(x, scale, zp, spec)
    assert q.dtype == spec.dtype
    assert int(q.min()) >= spec.qmin and int(q.max()) <= spec.qmax
    err = (dequantize(q, scale, zp, spec.axis) - x).abs()
    assert bool((err <= scale_b / 2 * (1 + 1e-6)).all())
    # fake_quantize is dequantize(quantize(x)) bit for bit.
    assert torch.equal(fake_quantize(x, scale, zp, spec), dequantize(q, scale, zp, spec.axis))


def test_per_tensor_error_at_most_half_a_step() -> None:
    x = torch.randn(1000) * 3
    spec = QuantSpec(signed=False, symmetric=False)
    scale, zp = compute_qparams(x.min(), x.max(), spec)
    _check_error_bound(x, spec, scale, zp, scale)


def test_per_channel_error_at_most_half_a_step() -> None:
    x = torch.randn(4, 6, 5) * torch.arange(1, 7).view(1, 6, 1)
    spec = QuantSpec(granularity="per_channel", axis=1, bits=4)
    scale, zp = compute_qparams(x.amin(dim=(0, 2)), x.amax(dim=(0, 2)), spec)
    assert scale.shape == (6,)
    _check_error_bound(x, spec, scale, zp, scale.view(1, 6, 1))


def test_per_group_error_at_most_half_a_step() -> None:
    x = torch.randn(3, 4, 2, 2)  # 16 elements per channel, groups of 8
    spec = QuantSpec(granularity="per_group", group_size=8, symmetric=False, signed=False)
    rows = x.reshape(3, 2, 8)
    scale, zp = compute_qparams(rows.amin(-1), rows.amax(-1), spec)
    assert scale.shape == (3, 2)
    per_element = scale.unsqueeze(-1).expand(3, 2, 8).reshape(3, 4, 2, 2)
    _check_error_bound(x, spec, scale, zp, per_element)


def test_values_outside_the_range_clamp() -> None:
    spec = QuantSpec(bits=8, signed=True, symmetric=True)
    scale, zp = compute_qparams(-1.0, 1.0, spec)
    q = quantize(torch.tensor([-5.0, 5.0]), scale, zp, spec)
    assert q.tolist() == [-128, 127]


def test_qparams_shape_mismatch_is_a_config_error() -> None:
    spec = default_weight_spec()
    with pytest.raises(ConfigError, match="3 channels"):
        quantize(torch.randn(3, 4), torch.ones(4), torch.zeros(4, dtype=torch.int32), spec)


# ----------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape", [(5,), (3, 7), (2, 3, 8), (1, 1)])
def test_pack_unpack_round_trip(bits: int, signed: bool, shape: tuple[int, ...]) -> None:
    spec = QuantSpec(bits=bits, signed=signed)
    q = torch.randint(spec.qmin, spec.qmax + 1, shape).to(spec.dtype)
    packed = pack_int(q, bits)
    per = 8 // bits
    assert packed.dtype == torch.uint8
    assert packed.shape == (*shape[:-1], -(-shape[-1] // per))
    assert torch.equal(unpack_int(packed, bits, shape, signed=signed), q)


def test_pack_known_layout() -> None:
    # Little end first: value 0 in the low nibble.
    assert pack_int(torch.tensor([1, -1], dtype=torch.int8), 4).tolist() == [0xF1]
    assert pack_int(torch.tensor([3, 0, 1, 2], dtype=torch.uint8), 2).tolist() == [0b10010011]


def test_pack_rejects_out_of_range_values_and_bad_widths() -> None:
    with pytest.raises(ConfigError, match=r"\[-8, 7\]"):
        pack_int(torch.tensor([8], dtype=torch.int8), 4)
    with pytest.raises(ConfigError, match="bits 2, 4 and 8"):
        pack_int(torch.tensor([1], dtype=torch.int8), 3)
    with pytest.raises(ConfigError, match="expected uint8 of shape"):
        unpack_int(torch.zeros(3, dtype=torch.uint8), 4, (7,))
