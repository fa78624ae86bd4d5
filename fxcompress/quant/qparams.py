"""Quantization arithmetic on plain tensors: qparams, (de)quantize, packing.

Conventions (the same as torch.ao's, so SQNR comparisons are like for like):

* ``compute_qparams`` widens the range to contain 0 (so zero is exactly
  representable, which zero padding and ReLU need), clamps the scale to at
  least ``float32`` eps, and for symmetric specs uses
  ``scale = max(|min|, |max|) / ((qmax - qmin) / 2)`` with a fixed zero point
  (0 signed, ``2**(bits-1)`` unsigned).  Affine specs use
  ``scale = (max - min) / (qmax - qmin)`` and
  ``zero_point = clamp(qmin - round(min / scale), qmin, qmax)``.
* Scales are rounded up to 16 significant bits (:func:`kernel_scale`, a relative
  change below 2**-15): then ``(q - zero_point) * scale`` is exact in float32
  for every code of 8 bits or fewer, so a float add of dequantized values
  rounds once, as the int8 kernels' fused residual add does.
* ``quantize`` is ``clamp(round(x * (1 / scale) + zero_point), qmin, qmax)``,
  each step rounded to float32 and the last one half to even: the order in
  which oneDNN's int8 kernels requantize, so a folded graph and its lowered
  model round every value alike.  ``dequantize`` is ``(q - zero_point) * scale``
  in float32.  :func:`fake_quantize` computes exactly ``dequantize(quantize(x))``,
  bit for bit.
* Scales are ``float32``, zero points ``int32``; their shape is ``[]`` per
  tensor, ``[C]`` per channel and ``[C, G]`` per group (see
  :class:`~fxcompress.quant.spec.QuantSpec` for what a group is).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from fxcompress.errors import ConfigError
from fxcompress.quant.spec import QuantSpec

__all__ = [
    "normalize_axis",
    "reduction_view",
    "apply_per_qparam",
    "compute_qparams",
    "kernel_scale",
    "quantize",
    "dequantize",
    "fake_quantize",
    "pack_int",
    "unpack_int",
]

_EPS = torch.finfo(torch.float32).eps


def normalize_axis(axis: int, ndim: int, where: str = "") -> int:
    """``axis`` as a non-negative index into a tensor of ``ndim`` dims.

    Raises ``ConfigError`` naming the axis, the tensor's ``ndim`` and ``where``.
    """
    if not -ndim <= axis < ndim:
        at = f" at {where}" if where else ""
        raise ConfigError(
            f"channel axis {axis} is out of range for a tensor with ndim={ndim}{at}; "
            f"set QuantSpec.axis to a value in [{-ndim}, {ndim - 1}]"
        )
    return axis % ndim


def _grouped_shape(shape: torch.Size, axis: int, group_size: int, where: str) -> tuple[int, int]:
    channels = shape[axis]
    rest = 1
    for i, n in enumerate(shape):
        if i != axis:
            rest *= n
    if rest % group_size:
        at = f" at {where}" if where else ""
        raise ConfigError(
            f"per_group quantization{at}: the {rest} elements per channel of a tensor of "
            f"shape {tuple(shape)} (axis {axis}) are not divisible by group_size={group_size}; "
            "choose a group_size that divides them or use granularity='per_channel'"
        )
    return channels, rest // group_size


def reduction_view(x: torch.Tensor, spec: QuantSpec, axis: Optional[int] = None,
                   where: str = "") -> torch.Tensor:
    """A view/copy of ``x`` whose last dim reduces to one value per qparam.

    Shapes: ``[N]`` per tensor, ``[C, N/C]`` per channel, ``[C, G, group_size]``
    per group.  ``axis`` overrides ``spec.axis``.
    """
    if spec.granularity == "per_tensor":
        return x.reshape(-1)
    ax = normalize_axis(spec.axis if axis is None else axis, x.ndim, where)
    moved = x.movedim(ax, 0)
    if spec.granularity == "per_channel":
        return moved.reshape(x.shape[ax], -1)
    channels, groups = _grouped_shape(x.shape, ax, spec.group_size, where)
    return moved.reshape(channels, groups, spec.group_size)


def apply_per_qparam(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
           granularity: str, axis: int,
           fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``fn(x_view, scale_view, zp_view)`` with the qparams broadcast per granularity.

    Per tensor and per channel ``x_view`` is ``x``; per group it is ``x``
    reshaped to ``[C, G, group_size]`` and the result is reshaped back.
    Raises ``ConfigError`` if the qparams' shape does not fit ``x``.
    """
    if granularity == "per_tensor":
        if scale.numel() != 1:
            raise ConfigError(f"per-tensor qparams must have one element, got shape {tuple(scale.shape)}")
        return fn(x, scale.reshape(()), zero_point.reshape(()))
    ax = normalize_axis(axis, x.ndim)
    channels = x.shape[ax]
    if granularity == "per_channel":
        if scale.shape != (channels,):
            raise ConfigError(
                f"per-channel qparams of shape {tuple(scale.shape)} do not match {channels} "
                f"channels on axis {ax} of a tensor of shape {tuple(x.shape)}"
            )
        shape = [1] * x.ndim
        shape[ax] = channels
        return fn(x, scale.reshape(shape), zero_point.reshape(shape))
    if scale.ndim != 2 or scale.shape[0] != channels:
        raise ConfigError(
            f"per-group qparams of shape {tuple(scale.shape)} do not match a tensor of shape "
            f"{tuple(x.shape)} with {channels} channels on axis {ax}"
        )
    moved = x.movedim(ax, 0)
    groups = scale.shape[1]
    view = moved.reshape(channels, groups, -1)
    out = fn(view, scale.unsqueeze(-1), zero_point.unsqueeze(-1))
    return out.reshape(moved.shape).movedim(0, ax)


def _granularity_of(scale: torch.Tensor) -> str:
    return ("per_tensor", "per_channel", "per_group")[min(scale.ndim, 2)]


def compute_qparams(min_val: torch.Tensor | float, max_val: torch.Tensor | float,
                    spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero point (int32) for the range ``[min_val, max_val]``.

    Elementwise over ``min_val``/``max_val`` (any matching shape), following
    the torch.ao conventions stated in the module docstring.  The returned
    range always contains 0; the scale is at least float32 eps.
    """
    lo = torch.as_tensor(min_val, dtype=torch.float32)
    hi = torch.as_tensor(max_val, dtype=torch.float32)
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    span = float(spec.qmax - spec.qmin)
    if spec.symmetric:
        scale = kernel_scale(torch.clamp(torch.maximum(-lo, hi) / (span / 2), min=_EPS))
        fixed = 0 if spec.signed else 1 << (spec.bits - 1)
        zero_point = torch.full_like(scale, fixed, dtype=torch.int32)
    else:
        scale = kernel_scale(torch.clamp((hi - lo) / span, min=_EPS))
        zero_point = spec.qmin - torch.round(lo / scale)
        zero_point = torch.clamp(zero_point, spec.qmin, spec.qmax).to(torch.int32)
    return scale, zero_point


def kernel_scale(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` rounded up to 16 significant bits (float32, same shape; up, so the
    quantized range still covers the observed one).

    Why: a code of at most 8 bits times such a scale needs at most 24 bits, so every
    dequantized value ``(q - zp) * scale`` is exact in float32.  The int8 kernels add
    a dequantized residual with one rounding (fused multiply-add); in float, the same
    add of an exact dequantized value rounds once too, so the two agree bit for bit.
    """
    mantissa, exponent = torch.frexp(scale.to(torch.float32))
    return torch.ldexp(torch.ceil(mantissa * 65536.0) / 65536.0, exponent).to(torch.float32)


def _quantize_math(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor,
                   qmin: int, qmax: int) -> torch.Tensor:
    # x * (1/scale), then + zp, each rounded to float32, then round half to even:
    # the int8 kernels' requantization order (see the module docstring).
    return torch.clamp(torch.round(x * torch.reciprocal(scale) + zp), qmin, qmax)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
             spec: QuantSpec, axis: Optional[int] = None) -> torch.Tensor:
    """Quantize float ``x`` to ``spec.dtype`` (int8/uint8) with the given qparams.

    ``axis`` overrides ``spec.axis`` (e.g. for a weight whose output channels
    are not on axis 0).  Every result lies in ``[spec.qmin, spec.qmax]``.
    """
    ax = spec.axis if axis is None else axis

    def fn(v: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return _quantize_math(v.float(), s, z, spec.qmin, spec.qmax)

    return apply_per_qparam(x, scale, zero_point, spec.granularity, ax, fn).to(spec.dtype)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
               axis: int = 0) -> torch.Tensor:
    """``(q - zero_point) * scale`` in float32.

    The granularity follows from ``scale.ndim`` (0: per tensor, 1: per
    channel along ``axis``, 2: per group, channels along ``axis``).
    """

    def fn(v: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return (v.float() - z) * s

    return apply_per_qparam(q, scale, zero_point, _granularity_of(scale), axis, fn)


class _FakeQuantSTE(torch.autograd.Function):
    """Quantize-dequantize; gradient passes where the rounded value is in range."""

    @staticmethod
    def forward(ctx, x, scale, zp, qmin, qmax):  # type: ignore[override]
        q = torch.round((x * torch.reciprocal(scale)).add_(zp))
        if ctx.needs_input_grad[0]:
            clamped = torch.clamp(q, qmin, qmax)
            ctx.save_for_backward(clamped == q)
            q = clamped
        else:
            q.clamp_(qmin, qmax)
        return q.sub_(zp).mul_(scale)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None, None, None


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                  spec: QuantSpec, axis: Optional[int] = None) -> torch.Tensor:
    """``dequantize(quantize(x))`` in ``x``'s dtype, differentiable in ``x``.

    The gradient is the straight-through estimator: 1 where
    ``round(x * (1 / scale) + zero_point)`` lies in ``[qmin, qmax]``, 0 elsewhere.
    ``scale`` and ``zero_point`` are treated as constants (for a learnable
    scale see :class:`~fxcompress.quant.fake_quant.FakeQuantize`).
    """
    ax = spec.axis if axis is None else axis
    scale = scale.detach()
    zero_point = zero_point.detach()

    def fn(v: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return _FakeQuantSTE.apply(v.float(), s, z, spec.qmin, spec.qmax)

    return apply_per_qparam(x, scale, zero_point, spec.granularity, ax, fn).to(x.dtype)


def _check_pack_bits(bits: int) -> int:
    if bits not in (2, 4, 8):
        raise ConfigError(
            f"cannot pack {bits}-bit values: packing supports bits 2, 4 and 8; "
            "store other widths unpacked as int8/uint8"
        )
    return 8 // bits


def pack_int(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack int8/uint8 values of width ``bits`` into bytes along the last dim.

    ``8 // bits`` values share a byte; value ``i`` of each byte sits in bits
    ``[i*bits, (i+1)*bits)`` (little end first).  A last dim that is not a
    multiple is zero padded.  ``q.dtype`` says whether the values are signed
    (int8, two's complement) or unsigned (uint8); values outside the ``bits``
    range raise ``ConfigError`` rather than being silently truncated.
    :func:`unpack_int` inverts it exactly.
    """
    per = _check_pack_bits(bits)
    if q.dtype not in (torch.int8, torch.uint8) or q.ndim == 0:
        raise ConfigError(
            f"pack_int expects an int8/uint8 tensor with at least one dim, "
            f"got {q.dtype} with shape {tuple(q.shape)}"
        )
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if q.dtype == torch.int8 else (0, (1 << bits) - 1)
    if q.numel() and (int(q.min()) < lo or int(q.max()) > hi):
        raise ConfigError(
            f"pack_int: values of dtype {q.dtype} must lie in [{lo}, {hi}] for bits={bits}, "
            f"got [{int(q.min())}, {int(q.max())}]"
        )
    if per == 1:
        return q.view(torch.uint8).clone()
    vals = q.to(torch.int16) & ((1 << bits) - 1)
    pad = (-q.shape[-1]) % per
    if pad:
        vals = torch.nn.functional.pad(vals, (0, pad))
    vals = vals.reshape(*vals.shape[:-1], -1, per)
    shifts = torch.arange(per, dtype=torch.int16) * bits
    return (vals << shifts).sum(dim=-1).to(torch.uint8)


def unpack_int(packed: torch.Tensor, bits: int, shape: torch.Size | tuple[int, ...],
               *, signed: bool = True) -> torch.Tensor:
    """Inverse of :func:`pack_int`: int8 (``signed``) or uint8 values of ``shape``."""
    per = _check_pack_bits(bits)
    shape = tuple(shape)
    expected = (*shape[:-1], -(-shape[-1] // per)) if shape else None
    if packed.dtype != torch.uint8 or tuple(packed.shape) != expected:
        raise ConfigError(
            f"unpack_int: expected uint8 of shape {expected} for {bits}-bit values of shape "
            f"{shape}, got {packed.dtype} of shape {tuple(packed.shape)}"
        )
    if per == 1:
        return packed.view(torch.int8).clone() if signed else packed.clone()
    shifts = torch.arange(per, dtype=torch.int16) * bits
    vals = (packed.to(torch.int16).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    vals = vals.reshape(*packed.shape[:-1], -1)[..., : shape[-1]]
    if signed:
        # Sign-extend: values with the top bit set are negative.
        vals = vals - ((vals >> (bits - 1)) << bits)
        return vals.to(torch.int8)
    return vals.to(torch.uint8)
