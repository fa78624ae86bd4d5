"""The ONNX form of each lowered module: a twin whose ``forward`` torch's ONNX exporter turns
into standard QDQ operators.

A lowered module computes with the operators of :mod:`fxcompress.oplib`, which ONNX does not
know. Its twin here holds the same integer state and writes the computation the way
onnxruntime's QDQ format spells it: ``DequantizeLinear`` (uint8 activations per tensor, int8
weights per output channel, int32 biases at ``input_scale * weight_scale``) in front of the
float op (``Conv``, ``Gemm``/``MatMul``, ``Add``, ``GlobalAveragePool``), the post-op, and
``QuantizeLinear`` after it; a uint8 activation table is a ``GatherElements`` of its codes. onnxruntime fuses such groups into its int8 kernels
(``QLinearConv``, ``QGemm``/``QLinearMatMul``, ``QLinearAdd``, ...). The Q/DQ nodes are
emitted with ``torch.onnx.ops.symbolic``; everything else is ordinary torch code the exporter
translates. Dynamic int8 linears become ``DynamicQuantizeLinear`` + ``MatMulInteger``
(``per_tensor``; ``per_token`` computes its per-row uint8 codes around the layer's zero point
with float ops and runs ``MatMulInteger`` with that zero point: the same integers, on
onnxruntime's u8s8 GEMM), weight-only linears ``MatMulNBits`` (onnxruntime's contrib op, domain
``com.microsoft``; 2, 4 and 8 bits).

What differs from the lowered model, by construction (docs/deployment.md): QuantizeLinear
divides by the scale where fxcompress multiplies by its float32 inverse, biases are rounded to
the int32 grid, pools average in float; each moves a code now and then (measured: SQNR of
onnxruntime vs fxcompress in benchmarks/deploy.py; :mod:`fxcompress.onnx_integer` is the
form without these differences). A module lowered with ``arithmetic="onnxruntime"`` rounds
as onnxruntime does (:mod:`fxcompress.oplib.arith_onnxruntime`): its twin is exact there, its
ReLU / hardtanh written as a ``Clip`` of the uint8 codes after ``QuantizeLinear`` (onnxruntime
keeps the conv one ``QLinearConv``). The NaN/Inf input guard of
:class:`~fxcompress.quant.lowered.Quantize` has no ONNX counterpart and is left out.

:func:`onnx_form` maps a module to its twin, or returns a reason why it has none.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fxcompress.oplib.arith import apply_post_op, unpack_unsigned
from fxcompress.oplib.arith_onnxruntime import bias_codes, code_bounds
from fxcompress.quant.lowered import (
    Dequantize,
    DynamicQuantLinear,
    QuantAdaptiveAvgPool2d,
    QuantAdd,
    QuantConvNd,
    Quantize,
    QuantizeProduct,
    QuantLinear,
    QuantMaxPool2d,
    QuantMul,
    QuantTable,
    WeightOnlyConv,
    WeightOnlyLinear,
)
from fxcompress.quant.layers import FoldedLayer, weighted_forward
from fxcompress.quant.lowered_attention import QuantMultiheadAttention
from fxcompress.quant.lowered_embedding import WeightOnlyEmbedding
from fxcompress.onnx_embedding import OnnxWeightOnlyEmbedding

__all__ = ["FORMS", "onnx_form", "NO_FORM"]

_symbolic = torch.onnx.ops.symbolic
_MS = "com.microsoft"


def _quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    return _symbolic("QuantizeLinear", (x, scale, zero_point), dtype=torch.uint8, shape=x.shape)


def _dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int | None = None
                ) -> torch.Tensor:
    attrs = {} if axis is None else {"axis": axis}
    return _symbolic("DequantizeLinear", (q, scale, zero_point), attrs, dtype=torch.float32, shape=q.shape)


def _u8(zero_point: torch.Tensor) -> torch.Tensor:
    return zero_point.to(torch.uint8)


class _QParams(nn.Module):
    """A twin's buffers: ONNX wants zero points in the codes' own dtype (uint8)."""

    def take(self, module: nn.Module, *prefixes: str) -> None:
        for p in prefixes:
            self.register_buffer(f"{p}_scale", getattr(module, f"{p}_scale").detach().clone())
            self.register_buffer(f"{p}_zero_point", _u8(getattr(module, f"{p}_zero_point")))

    def quantize(self, y: torch.Tensor, prefix: str) -> torch.Tensor:
        """``QuantizeLinear`` of ``y`` with the ``prefix`` qparams."""
        return _quantize(y, getattr(self, f"{prefix}_scale"), getattr(self, f"{prefix}_zero_point"))

    def take_weight(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                    input_scale: torch.Tensor) -> None:
        """int8 weight with per-channel scales; bias as int32 codes at ``input_scale * weight_scale``."""
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("weight_scale", weight_scale.detach().float().clone())
        self.register_buffer("weight_zero_point", torch.zeros(weight.shape[0], dtype=torch.int8))
        if bias is None:
            self.bias_codes = None
            return
        bias_scale = (input_scale.float() * weight_scale.float()).detach()
        self.register_buffer("bias_codes", bias_codes(bias, input_scale, weight_scale))
        self.register_buffer("bias_scale", bias_scale)
        self.register_buffer("bias_zero_point", torch.zeros(weight.shape[0], dtype=torch.int32))

    def weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        w = _dequantize(self.weight, self.weight_scale, self.weight_zero_point, axis=0)
        b = None if self.bias_codes is None else _dequantize(self.bias_codes, self.bias_scale,
                                                             self.bias_zero_point, axis=0)
        return w, b


class OnnxQuantize(_QParams):
    """The activation, then :meth:`quantize` (the integer form's twin overrides only that)."""

    def __init__(self, m: Quantize) -> None:
        super().__init__()
        self.take(m, "output")
        self.activation, self.activation_args = m.activation, m.activation_args

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantize(apply_post_op(x.float(), self.activation, self.activation_args), "output")


class OnnxQuantizeProduct(_QParams):
    """The gate's product, then :meth:`quantize` (the integer form's twin overrides only that)."""

    def __init__(self, m: QuantizeProduct) -> None:
        super().__init__()
        self.take(m, "output")

    def forward(self, x: torch.Tensor, gains: torch.Tensor) -> torch.Tensor:
        return self.quantize(x * gains, "output")


class OnnxDequantize(_QParams):
    def __init__(self, m: Dequantize) -> None:
        super().__init__()
        self.take(m, "input")

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return _dequantize(q, self.input_scale, self.input_zero_point)


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class OnnxQuantConv(_QParams):
    """``Pad`` on the codes (zero padding pads with the zero point), DQ, ``Conv``, the
    residual (DQ) added, the post-op, Q (or float32 out)."""

    def __init__(self, m: QuantConvNd) -> None:
        super().__init__()
        self.take(m, "input", *(["output"] if m.output == "uint8" else []),
                  *(["residual"] if m.residual and m.output == "uint8" else []))
        self.take_weight(m.weight, m.weight_scale, m.bias, m.input_scale)
        self.dims, self.uint8_out, self.residual = m.spatial_dims, m.output == "uint8", m.residual
        self.geometry = (list(m.stride), list(m.padding), list(m.dilation), m.groups)
        self.pre_padding, self.padding_mode = list(m.pre_padding), m.padding_mode
        self.pad_code = int(m.input_zero_point)  # a Python int: the exporter must see a constant
        self.post_op, self.post_op_args = m.post_op, m.post_op_args
        # onnxruntime's arithmetic: the post-op is a clamp of the codes after QuantizeLinear, so
        # that onnxruntime keeps DQ -> Conv -> Q one QLinearConv (a float Relu/Clip would split it).
        self.code_bounds = (code_bounds(m.post_op, m.post_op_args, *m.qparams("output"))
                            if m.arithmetic == "onnxruntime" else None)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.pre_padding:
            x = (F.pad(x, self.pre_padding, value=self.pad_code) if self.padding_mode == "zeros"
                 else F.pad(x, self.pre_padding, mode=self.padding_mode))
        w, b = self.weight_and_bias()
        stride, padding, dilation, groups = self.geometry
        y = _CONV[self.dims](_dequantize(x, self.input_scale, self.input_zero_point), w, b, stride, padding,
                             dilation, groups)
        if hasattr(self, "conv_scale"):  # calibrated: Q-DQ here lets onnxruntime run QLinearConv
            y = _dequantize(_quantize(y, self.conv_scale, self.conv_zero_point), self.conv_scale,
                            self.conv_zero_point)
        if self.residual and residual is not None:
            y = y + (_dequantize(residual, self.residual_scale, self.residual_zero_point) if self.uint8_out
                     else residual)
        if self.code_bounds is not None:
            q = _quantize(y, self.output_scale, self.output_zero_point)
            return q if self.code_bounds == (0, 255) else q.clamp(*self.code_bounds)
        y = apply_post_op(y, self.post_op, self.post_op_args)
        return _quantize(y, self.output_scale, self.output_zero_point) if self.uint8_out else y


    def requantize_conv_output(self, scale: torch.Tensor, zero_point: torch.Tensor) -> OnnxQuantConv:
        """Requantize the conv's raw output with ``(scale, zero_point)`` before the residual add
        and post-op (:func:`fxcompress.onnx_calibrate.conv_output_ranges` measures them)."""
        self.register_buffer("conv_scale", scale.detach().float().reshape(()))
        self.register_buffer("conv_zero_point", zero_point.detach().to(torch.uint8).reshape(()))
        return self


class OnnxQuantLinear(_QParams):
    """DQ, ``Gemm`` on the rows (a 2-D view: onnxruntime fuses DQ-Gemm-Q into ``QGemm``), the
    post-op, Q (or float32 out)."""

    def __init__(self, m: QuantLinear) -> None:
        super().__init__()
        self.take(m, "input", *(["output"] if m.output == "uint8" else []))
        self.take_weight(m.weight, m.weight_scale, m.bias, m.input_scale)
        self.uint8_out, self.post_op, self.post_op_args = m.output == "uint8", m.post_op, m.post_op_args

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight_and_bias()
        rows = x.reshape(-1, x.shape[-1])
        y = apply_post_op(F.linear(_dequantize(rows, self.input_scale, self.input_zero_point), w, b),
                          self.post_op, self.post_op_args)
        y = y.reshape(*x.shape[:-1], y.shape[-1])
        return _quantize(y, self.output_scale, self.output_zero_point) if self.uint8_out else y


class OnnxMaxPool(nn.Module):
    """``MaxPool`` on the uint8 codes themselves (exact: qparams pass through)."""

    def __init__(self, m: QuantMaxPool2d) -> None:
        super().__init__()
        self.args = (list(m.kernel_size), list(m.stride), list(m.padding), list(m.dilation), m.ceil_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel, stride, padding, dilation, ceil_mode = self.args
        return F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode)


class OnnxAdaptiveAvgPool(_QParams):
    """DQ, the pool, Q; a pool computing onnxruntime's arithmetic (global) as
    ``GlobalAveragePool``, which onnxruntime fuses into ``QLinearGlobalAveragePool``."""

    def __init__(self, m: QuantAdaptiveAvgPool2d) -> None:
        super().__init__()
        self.take(m, "input", "output")
        self.output_size = list(m.output_size)
        self.global_op = m.arithmetic == "onnxruntime"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = _dequantize(x, self.input_scale, self.input_zero_point)
        if self.global_op:
            y = _symbolic("GlobalAveragePool", (xf,), dtype=torch.float32, shape=(*x.shape[:2], 1, 1))
        else:
            y = F.adaptive_avg_pool2d(xf, self.output_size)
        return _quantize(y, self.output_scale, self.output_zero_point)


class OnnxQuantMul(_QParams):
    """DQ, DQ, ``Mul``, Q: onnxruntime fuses it into ``QLinearMul``."""

    def __init__(self, m: QuantMul) -> None:
        super().__init__()
        self.take(m, "input", "other", "output")

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        y = _dequantize(a, self.input_scale, self.input_zero_point) * _dequantize(b, self.other_scale,
                                                                                  self.other_zero_point)
        return _quantize(y, self.output_scale, self.output_zero_point)


class OnnxQuantAdd(_QParams):
    def __init__(self, m: QuantAdd) -> None:
        super().__init__()
        self.take(m, "input", "other", "output")
        self.relu = m.relu
        # onnxruntime's arithmetic: the ReLU is the clamp at the code of 0.0 after QLinearAdd.
        self.relu_code = int(m.output_zero_point) if m.relu and m.arithmetic == "onnxruntime" else None

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        y = _dequantize(a, self.input_scale, self.input_zero_point) + _dequantize(b, self.other_scale,
                                                                                  self.other_zero_point)
        if self.relu_code is not None:
            q = _quantize(y, self.output_scale, self.output_zero_point)
            return q.clamp(min=self.relu_code) if self.relu_code > 0 else q
        return _quantize(F.relu(y) if self.relu else y, self.output_scale, self.output_zero_point)


class OnnxQuantTable(nn.Module):
    """The 256 output codes looked up by the input codes (onnxruntime computes it exactly): the
    same table as the module, in the integer form too. Written as ``GatherElements`` of the
    flattened codes: onnxruntime's ``Gather`` copies each byte with its own ``memcpy`` (measured
    8x slower on a 96x112x112 activation, and 80% of EfficientNet-B0's time)."""

    def __init__(self, m: QuantTable) -> None:
        super().__init__()
        self.register_buffer("table", m.table.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1).to(torch.int32)
        y = _symbolic("GatherElements", (self.table, flat), {"axis": 0}, dtype=torch.uint8, shape=flat.shape)
        return y.reshape(x.shape)


class OnnxDynamicLinear(nn.Module):
    """``DynamicQuantizeLinear`` + ``MatMulInteger`` (``per_tensor``: fxcompress's own uint8
    range, zero included), or per-row uint8 codes from float ops around the layer's token
    zero point + ``MatMulInteger`` (``per_token``); then the scales and the bias in float."""

    def __init__(self, m: DynamicQuantLinear) -> None:
        super().__init__()
        self.register_buffer("weight_t", m.weight.detach().t().contiguous())  # (K, N) for MatMulInteger
        self.register_buffer("weight_scale", m.weight_scale.detach().float().clone())
        self.register_buffer("bias", None if m.bias is None else m.bias.detach().float().clone())
        self.per_token, self.out_features = m.granularity == "per_token", m.out_features
        zp = m.token_zero_point
        self.register_buffer("code_zero_point", torch.tensor(zp, dtype=torch.uint8))
        # quantize_per_token_uint8's arithmetic: the reach of the codes above and below zp.
        self.above, self.below, self.zero_point = 1.0 / (255 - zp), 1.0 / zp, float(zp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (*x.shape[:-1], self.out_features)
        if self.per_token:
            # uint8 codes (zero point zp) on onnxruntime's u8s8 GEMM: its s8s8 MatMulInteger was
            # 12x slower here.
            hi = x.amax(dim=-1, keepdim=True).clamp(min=0.0) * self.above
            lo = x.amin(dim=-1, keepdim=True).clamp(max=0.0) * -self.below
            scale = torch.maximum(hi, lo).clamp(min=1e-12)
            codes = ((x * scale.reciprocal()).round() + self.zero_point).to(torch.uint8)
            acc = _symbolic("MatMulInteger", (codes, self.weight_t, self.code_zero_point), dtype=torch.int32,
                            shape=shape)
            y = acc.float() * scale * self.weight_scale
        else:
            codes, scale, zero_point = torch.onnx.ops.symbolic_multi_out(
                "DynamicQuantizeLinear", (x,), dtypes=(torch.uint8, torch.float32, torch.uint8),
                shapes=(x.shape, (), ()))
            acc = _symbolic("MatMulInteger", (codes, self.weight_t, zero_point), dtype=torch.int32, shape=shape)
            y = acc.float() * (scale * self.weight_scale)
        return y if self.bias is None else y + self.bias


class OnnxWeightOnlyLinear(nn.Module):
    """onnxruntime's ``MatMulNBits`` (``com.microsoft``): codes packed per block of
    ``group_size`` columns, a float scale and (4-bit) a packed zero point per block."""

    def __init__(self, m: WeightOnlyLinear) -> None:
        super().__init__()
        n, k, blocks = m.out_features, m.in_features, m.scale.shape[1]
        group = k // blocks
        if m.bits == 8:
            codes = m.weight.detach().view(torch.int8).to(torch.int16) + 128  # MatMulNBits codes are unsigned
            zero_points = torch.full((n, blocks), 128, dtype=torch.uint8)
        else:
            codes = unpack_unsigned(m.weight.detach(), m.bits, (n, k)).to(torch.int16)
            zero_points = m.zero_point.detach().to(torch.uint8)
        codes = codes.to(torch.uint8).view(n, blocks, group)
        if m.bits < 8:  # 8 // bits codes a byte, the first in the lowest bits (MatMulNBits' layout)
            codes = _pack_codes(codes, m.bits)
            zero_points = _pack_codes(zero_points, m.bits)
        self.register_buffer("codes", codes.contiguous())
        self.register_buffer("scales", m.scale.detach().float().reshape(-1).clone())
        self.register_buffer("zero_points", zero_points.reshape(-1).contiguous())
        self.register_buffer("bias", None if m.bias is None else m.bias.detach().float().clone())
        self.attrs = {"K": k, "N": n, "bits": m.bits, "block_size": group}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _symbolic(f"{_MS}::MatMulNBits", (x.float(), self.codes, self.scales, self.zero_points), self.attrs,
                      dtype=torch.float32, shape=(*x.shape[:-1], self.attrs["N"]), version=1)
        return (y if self.bias is None else y + self.bias).to(x.dtype)


class OnnxWeightOnlyConv(nn.Module):
    """``DequantizeLinear`` of the int8 weight (per output channel), then the float ``Conv``
    (a pad by the mode first, as ``nn.Conv*d``): the file keeps the codes."""

    def __init__(self, m: WeightOnlyConv) -> None:
        super().__init__()
        self.register_buffer("weight", m.weight.detach().clone())
        self.register_buffer("weight_scale", m.weight_scale.detach().float().clone())
        self.register_buffer("weight_zero_point", torch.zeros(m.weight.shape[0], dtype=torch.int8))
        self.register_buffer("bias", None if m.bias is None else m.bias.detach().clone())
        self.dims, self.padding_mode, self.reversed_padding = m.spatial_dims, m.padding_mode, m._reversed_padding
        self.geometry = (m.stride, m.padding, m.dilation, m.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = _dequantize(self.weight, self.weight_scale, self.weight_zero_point, axis=0)
        stride, padding, dilation, groups = self.geometry
        if self.padding_mode != "zeros":
            x, padding = F.pad(x, self.reversed_padding, mode=self.padding_mode), 0
        return _CONV[self.dims](x, w, self.bias, stride, padding, dilation, groups)


class OnnxFoldedLayer(nn.Module):
    """A folded (fake-quantized) layer as its float simulation: the layer with its
    dequantized weight. The folded layer's integer-exact branch picks itself per input (a
    data-dependent test no exporter can record); it equals this float path up to round-off."""

    def __init__(self, m: FoldedLayer) -> None:
        super().__init__()
        self.module = copy.deepcopy(m.module)
        self.op = m.op
        self.register_buffer("weight", m.dequantized_weight().detach().clone())
        self.register_buffer("bias", None if m.bias is None else m.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return weighted_forward(self.module, self.op, x, self.weight, self.bias)


def _pack_codes(values: torch.Tensor, bits: int) -> torch.Tensor:
    """``(..., k)`` unsigned ``bits``-bit values -> ``(..., ceil(k * bits / 8))`` bytes, ``8 // bits``
    a byte, the first in the lowest bits (zero-padded at the end)."""
    per = 8 // bits
    if values.shape[-1] % per:
        pad = per - values.shape[-1] % per
        values = torch.cat([values, values.new_zeros((*values.shape[:-1], pad))], dim=-1)
    packed = torch.zeros((*values.shape[:-1], values.shape[-1] // per), dtype=torch.uint8)
    for i in range(per):
        packed |= values[..., i::per] << (i * bits)
    return packed


def _weight_only(m: WeightOnlyLinear) -> nn.Module | str:
    group = m.in_features // m.scale.shape[1]
    if m.bits not in (2, 4, 8):
        return (f"onnxruntime's MatMulNBits takes 2-, 4- and 8-bit weights, this one has {m.bits}; nearest "
                f"supported form: quantize_weights with bits=4")
    if group < 16 or group & (group - 1):
        return (f"MatMulNBits needs a power-of-two block of at least 16 columns, this one has groups of {group}; "
                f"nearest supported form: quantize_weights with group_size=32, 64 or 128")
    return OnnxWeightOnlyLinear(m)


def _conv(m: QuantConvNd) -> nn.Module | str:
    if m.padding_mode == "circular":
        return ("circular padding has no uint8 ONNX Pad mode here; nearest supported form: padding_mode "
                "'zeros', 'reflect' or 'replicate'")
    return OnnxQuantConv(m)


#: Lowered class -> its twin's constructor (a module, or the reason it has no ONNX form).
#: :class:`QuantMultiheadAttention` keeps its own forward; its projections get their twins.
FORMS: dict[type, Callable[[nn.Module], nn.Module | str]] = {
    Quantize: OnnxQuantize,
    QuantizeProduct: OnnxQuantizeProduct,
    Dequantize: OnnxDequantize,
    QuantLinear: OnnxQuantLinear,
    QuantMaxPool2d: OnnxMaxPool,
    QuantAdaptiveAvgPool2d: OnnxAdaptiveAvgPool,
    QuantAdd: OnnxQuantAdd,
    QuantTable: OnnxQuantTable,
    QuantMul: OnnxQuantMul,
    DynamicQuantLinear: OnnxDynamicLinear,
    WeightOnlyLinear: _weight_only,
    WeightOnlyConv: OnnxWeightOnlyConv,
    WeightOnlyEmbedding: OnnxWeightOnlyEmbedding,
    FoldedLayer: OnnxFoldedLayer,
}
#: Marker: the module exports as it is (its children may have twins).
NO_FORM = object()


def onnx_form(module: nn.Module) -> nn.Module | str | object:
    """The QDQ twin of a lowered module, :data:`NO_FORM` for a module that exports as it is
    (float modules, :class:`QuantMultiheadAttention`), or a sentence saying why there is none.
    (The integer form's twins, :func:`fxcompress.onnx_integer.integer_form`, come first where
    that form is asked for.)"""
    if isinstance(module, QuantConvNd):
        return _conv(module)
    if type(module) in FORMS:
        return FORMS[type(module)](module)
    if isinstance(module, QuantMultiheadAttention) or getattr(module, "fxc_role", None) != "lowered":
        return NO_FORM
    return f"{type(module).__qualname__} has no ONNX form in fxcompress.onnx_forms"
