"""The arithmetic of the int8 kernels, with portable torch ops: the reference they are held to.

oneDNN's x86 int8 conv and linear (``torch.ops.onednn.qconv_pointwise`` /
``qlinear_pointwise``) accumulate ``(x_code - x_zp) * w_code`` exactly in int32, then
finish in float32, every step rounded to float32:

1. ``y = float(acc) * input_scale * weight_scale[c] + bias[c]`` (:func:`rescale`);
2. a fused residual (``sum``) adds ``(r - r_zp) * r_scale`` with one rounding
   (:func:`add_dequantized`);
3. the post-op; then requantization as :func:`fxcompress.quant.uint8.quantize_uint8`.

Measured bit for bit on torch 2.14.1 with AVX512-VNNI (AMD EPYC) over every conv of
resnet50, mobilenet_v2 and efficientnet_b0 at 224 px; other operation orders (one
combined scale, a fused multiply-add of the bias, division by the output scale) each
differ at a few codes in 10^7. Other kernel paths round some float32 steps differently
(Intel AMX: the fused residual ``sum`` and some 3-channel first convs, about 1 output in
10^4), which is why the x86 lowering is held to one code per op, not to equality
(:mod:`fxcompress.quant.contract`).

The folded graph (:class:`~fxcompress.quant.layers.FoldedLayer`) and the reference
path of the lowered modules compute with these functions, so a folded model and its
reference lowering agree exactly, on any CPU.
The accumulation here is a float64 conv/linear of integer values: every product and
partial sum is an integer below 2**53, hence exact whatever algorithm torch picks
(float32 accumulation is not: its rounding depends on the algorithm and the memory
format, and lands one code off at rounding ties).
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["accumulate", "rescale", "add_dequantized"]


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
