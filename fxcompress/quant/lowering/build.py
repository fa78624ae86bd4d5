"""Lowered modules built from folded ones: static int8 conv/linear, and the float twins.

A :class:`~fxcompress.quant.layers.FoldedLayer` holds integer weights with scales and
zero points; :func:`layer_problem` says whether the x86 int8 kernels can take it (a 1-,
2- or 3-D conv with any padding, or a linear; signed symmetric weights of at most 8 bits
per tensor or per output channel, zero points 0), and :func:`quant_conv` / :func:`quant_linear` build the lowered
module with the activation qparams the graph gives. :func:`float_twin` is the float
module computing what a folded layer computes (its dequantized weight): what the speed
check compares against; :func:`kept_float` is what a layer becomes when int8 is slower (the
same float conv, its weight stored as the int8 codes).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from fxcompress.quant.activations import QDQ
from fxcompress.quant.layers import FoldedLayer
from fxcompress.quant.lowered import (
    QuantAdaptiveAvgPool2d, QuantAdd, QuantConv1d, QuantConv2d, QuantConv3d, QuantConvNd, QuantLinear, QuantMaxPool2d,
    QuantMul, QuantTable, WeightOnlyConv,
)

__all__ = ["QParams", "STATS_KIND", "uint8_qparams", "layer_problem", "float_twin", "kept_float", "quant_conv",
           "quant_linear"]

# The ops of the layers the x86 int8 kernels compute (what a folded layer's ``op`` names).
_KERNEL_OPS = ("conv1d", "conv2d", "conv3d", "linear")

#: The stats kind (``int8_ops`` key) of each uint8 op made between int8 layers.
STATS_KIND: dict[type, str] = {QuantMaxPool2d: "max_pool", QuantAdd: "add", QuantAdaptiveAvgPool2d: "avg_pool",
                               QuantTable: "table", QuantMul: "mul"}


@dataclass(frozen=True)
class QParams:
    """A uint8 activation's per-tensor ``(scale, zero_point)``."""

    scale: float
    zero_point: int


def uint8_qparams(qdq: QDQ) -> QParams | None:
    """The qparams of a quantize-dequantize the uint8 kernels reproduce exactly, else None.

    That is 8-bit unsigned (codes 0..255) per tensor: the kernels requantize onto
    exactly that range.
    """
    spec = qdq.spec
    if spec.dtype != torch.uint8 or (spec.qmin, spec.qmax) != (0, 255) or qdq.scale.numel() != 1:
        return None
    return QParams(float(qdq.scale.reshape(())), int(qdq.zero_point.reshape(())))


def layer_problem(layer: FoldedLayer) -> str | None:
    """Why the x86 int8 conv/linear cannot take this folded layer, or None when it can."""
    module, spec = layer.module, layer.spec
    if layer.op.startswith("conv_transpose"):
        return (f"no int8 kernel for {type(module).__name__}: this torch build's oneDNN ops have no int8 "
                f"transposed conv; it stays folded (int8 weights, float compute)")
    if layer.op not in _KERNEL_OPS:
        return f"no int8 kernel for {type(module).__name__} (1/2/3-D convs and linears only)"
    if not (spec.signed and spec.symmetric):
        return "weights are not signed symmetric (the int8 kernels ignore weight zero points)"
    if spec.granularity == "per_group":
        return "weights are quantized per group; the kernels take one scale per output channel"
    if spec.granularity == "per_channel" and spec.axis % len(layer.weight_shape) != 0:
        return f"per-channel weights along axis {spec.axis}; the kernels take output channels (axis 0)"
    if bool((layer.weight_zero_point != 0).any()):
        return "weight zero points are not 0"
    return None


def _weight_scale(layer: FoldedLayer) -> torch.Tensor:
    """One scale per output channel (a per-tensor scale repeated)."""
    out_channels = layer.weight_shape[0]
    return layer.weight_scale.detach().float().reshape(-1).expand(out_channels).contiguous() \
        if layer.weight_scale.numel() == 1 else layer.weight_scale.detach().float().reshape(out_channels)


def float_twin(layer: FoldedLayer) -> nn.Module:
    """A copy of the layer's float module computing with its dequantized weight."""
    twin = copy.deepcopy(layer.module)  # holds no weight: the copy is of bias and hyperparameters
    twin.weight = nn.Parameter(layer.dequantized_weight().detach(), requires_grad=False)
    return twin


def kept_float(layer: FoldedLayer, backend: str) -> nn.Module:
    """The module of a layer the lowering keeps float: :func:`float_twin`'s computation, bit for
    bit, with a conv's weight stored as its int8 codes (:class:`WeightOnlyConv`, a quarter of the
    bytes); a linear stays :func:`float_twin`."""
    twin = float_twin(layer)
    if layer.op in ("conv1d", "conv2d", "conv3d") and layer_problem(layer) is None:
        return WeightOnlyConv.from_float(twin, _weight_scale(layer), backend=backend)
    return twin


_CONVS: dict[int, type[QuantConvNd]] = {1: QuantConv1d, 2: QuantConv2d, 3: QuantConv3d}


def quant_conv(layer: FoldedLayer, x: QParams, out: QParams | None, *, post_op: str,
               post_op_args: tuple[float, ...], residual: QParams | None | bool, backend: str) -> QuantConvNd:
    """The lowered conv (:class:`QuantConv1d` / ``2d`` / ``3d``) of a folded conv; ``out=None``
    gives a float32 output.

    ``residual``: False for none, the residual's qparams for a uint8 output, True for a
    float output (float residual).
    """
    fused = residual is not False
    r = residual if isinstance(residual, QParams) else None
    return _CONVS[len(layer.weight_shape) - 2].from_float(
        float_twin(layer), _weight_scale(layer), x.scale, x.zero_point,
        None if out is None else out.scale, 0 if out is None else out.zero_point,
        post_op=post_op, post_op_args=post_op_args, residual=fused,
        residual_scale=None if r is None else r.scale, residual_zero_point=0 if r is None else r.zero_point,
        backend=backend)


def quant_linear(layer: FoldedLayer, x: QParams, out: QParams | None, *, post_op: str,
                 post_op_args: tuple[float, ...], backend: str) -> QuantLinear:
    """A :class:`QuantLinear` for a folded linear; ``out=None`` gives a float32 output."""
    return QuantLinear.from_float(
        float_twin(layer), _weight_scale(layer), x.scale, x.zero_point,
        None if out is None else out.scale, 0 if out is None else out.zero_point,
        post_op=post_op, post_op_args=post_op_args, backend=backend)
