"""The ``integer`` ONNX form of static int8: fxcompress's own arithmetic, step by step.

In the QDQ form (:mod:`fxcompress.onnx_forms`) onnxruntime fuses each
``DequantizeLinear -> Conv -> QuantizeLinear`` group into ``QLinearConv`` and requantizes
its way: the bias rounded to the int32 accumulator grid, one combined float scale. Each
of those moves a code at about 1 output in 10^3 (measured per op, teacher forced, on
mobilenet_v2 and resnet18), where fxcompress's own kernel paths differ from its reference
at about 1 in 10^6, and deep networks amplify such flips.

The twins here write the reference arithmetic of :mod:`fxcompress.oplib.arith` with
standard operators instead, so that onnxruntime computes what ``backend="reference"``
computes: ``ConvInteger`` / ``MatMulInteger`` (the exact int32 accumulation, on
onnxruntime's u8u8 int8 GEMM), then ``Cast``, ``Mul`` by the input scale, ``Mul`` by the
per-channel weight scale, ``Add`` of the float bias, a fused residual added in float64
with one rounding, the post-op, ``Mul`` by the float32 inverse of the output scale,
``Add`` of the zero point, ``Round`` (half to even), ``Clip``, ``Cast`` to uint8. Pools
sum the integer codes exactly (``ReduceSum`` of values below 2**24) and scale as the
pooling kernel does; adds and squeeze-excitation products are float ops in the
reference's order. What still differs: onnxruntime's own transcendental functions
(``Sigmoid`` in SiLU, ``Tanh``, ``Erf`` in GELU) are not torch's, which moves a code now
and then where such a post-op sits before a requantization.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fxcompress.oplib.arith import apply_post_op, mul_code_table
from fxcompress.onnx_forms import OnnxAdaptiveAvgPool, OnnxQuantAdd, OnnxQuantize, OnnxQuantizeProduct
from fxcompress.quant.lowered import QuantAdaptiveAvgPool2d, QuantAdd, QuantConvNd, QuantMul
from fxcompress.quant.lowered import Quantize, QuantizeProduct, QuantLinear

__all__ = ["INTEGER_FORMS", "integer_form"]

_symbolic = torch.onnx.ops.symbolic


class _Requant(nn.Module):
    """Buffers and steps shared by the integer twins: float32 scales, their float32
    inverses (as :func:`fxcompress.oplib.arith.quantize_uint8` computes them) and zero
    points as float32 values."""

    def take(self, module: nn.Module, *prefixes: str) -> None:
        for p in prefixes:
            scale = getattr(module, f"{p}_scale").detach().float().reshape(())
            self.register_buffer(f"{p}_scale", scale.clone())
            self.register_buffer(f"{p}_inverse", scale.reciprocal())
            self.register_buffer(f"{p}_zero_point", getattr(module, f"{p}_zero_point").detach().float().reshape(()))
            self.register_buffer(f"{p}_zero_point_u8", getattr(module, f"{p}_zero_point").detach().to(torch.uint8)
                                 .reshape(()))

    def quantize(self, y: torch.Tensor, prefix: str) -> torch.Tensor:
        """``clamp(round(y * (1 / scale) + zp), 0, 255)`` as uint8, each step in float32."""
        y = y * getattr(self, f"{prefix}_inverse") + getattr(self, f"{prefix}_zero_point")
        return torch.clamp(torch.round(y), 0.0, 255.0).to(torch.uint8)

    def dequantize(self, q: torch.Tensor, prefix: str) -> torch.Tensor:
        """``(q - zp) * scale`` in float32 (exact: the difference is a small integer)."""
        return (q.float() - getattr(self, f"{prefix}_zero_point")) * getattr(self, f"{prefix}_scale")

    def add_dequantized(self, y: torch.Tensor, r: torch.Tensor, prefix: str) -> torch.Tensor:
        """``y + (r - zp) * scale`` rounded once to float32 (in float64, as
        :func:`fxcompress.oplib.arith.add_dequantized`)."""
        scale = getattr(self, f"{prefix}_scale").double()
        zero_point = getattr(self, f"{prefix}_zero_point").double()
        return (y.double() + (r.double() - zero_point) * scale).float()


class _Rescale(_Requant):
    """A layer's int8 weight and the float32 rescale after its int32 accumulation."""

    def take_layer(self, m: nn.Module, channel_shape: tuple[int, ...]) -> None:
        # Weights as uint8 codes ``w + 128`` with zero point 128: the same integers, and
        # onnxruntime's u8u8 GEMM widens to 16 bits before multiplying (exact on every CPU),
        # where its u8s8 path on AVX2 sums pairs in saturating 16-bit lanes (and was 2.8x
        # slower in ConvInteger here).
        self.register_buffer("weight", (m.weight.detach().to(torch.int16) + 128).to(torch.uint8))
        self.register_buffer("weight_zero_point", torch.tensor(128, dtype=torch.uint8))
        self.register_buffer("weight_scale", m.weight_scale.detach().float().reshape(channel_shape).clone())
        self.register_buffer("bias", None if m.bias is None else m.bias.detach().float().reshape(channel_shape).clone())

    def rescale(self, acc: torch.Tensor) -> torch.Tensor:
        """``float(acc) * input_scale * weight_scale[c] + bias[c]``, step by step."""
        y = acc.float() * self.input_scale * self.weight_scale
        return y if self.bias is None else y + self.bias


class IntegerQuantConv(_Rescale):
    """``ConvInteger`` (padding with the input's zero point: exact for zero padding), then
    the reference rescale, residual, post-op and requantization."""

    def __init__(self, m: QuantConvNd) -> None:
        super().__init__()
        self.uint8_out, self.residual, self.dims = m.output == "uint8", m.residual, m.spatial_dims
        self.take(m, "input", *(["output"] if self.uint8_out else []),
                  *(["residual"] if m.residual and self.uint8_out else []))
        self.take_layer(m, (1, -1) + (1,) * self.dims)
        self.kernel_size, self.out_channels = list(m.kernel_size), m.out_channels
        self.attrs = {"strides": list(m.stride), "pads": list(m.padding) * 2, "dilations": list(m.dilation),
                      "group": m.groups}
        self.pre_padding, self.padding_mode = list(m.pre_padding), m.padding_mode
        self.pad_code = int(m.input_zero_point)
        self.post_op, self.post_op_args = m.post_op, m.post_op_args

    def _out_shape(self, shape: torch.Size) -> list:
        s, p, d = self.attrs["strides"], self.attrs["pads"], self.attrs["dilations"]
        spatial = [(shape[2 + i] + 2 * p[i] - d[i] * (self.kernel_size[i] - 1) - 1) // s[i] + 1
                   for i in range(self.dims)]
        return [shape[0], self.out_channels, *spatial]

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.pre_padding:
            x = (F.pad(x, self.pre_padding, value=self.pad_code) if self.padding_mode == "zeros"
                 else F.pad(x, self.pre_padding, mode=self.padding_mode))
        acc = _symbolic("ConvInteger", (x, self.weight, self.input_zero_point_u8, self.weight_zero_point), self.attrs,
                        dtype=torch.int32, shape=self._out_shape(x.shape))
        y = self.rescale(acc)
        if self.residual and residual is not None:
            y = self.add_dequantized(y, residual, "residual") if self.uint8_out else y + residual
        y = apply_post_op(y, self.post_op, self.post_op_args)
        return self.quantize(y, "output") if self.uint8_out else y


class IntegerQuantLinear(_Rescale):
    """``MatMulInteger`` on the rows against the transposed int8 weight, then the reference
    rescale, post-op and requantization."""

    def __init__(self, m: QuantLinear) -> None:
        super().__init__()
        self.uint8_out = m.output == "uint8"
        self.take(m, "input", *(["output"] if self.uint8_out else []))
        self.take_layer(m, (-1,))
        self.register_buffer("weight_t", self.weight.t().contiguous())  # (K, N) for MatMulInteger
        del self.weight
        self.post_op, self.post_op_args, self.out_features = m.post_op, m.post_op_args, m.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acc = _symbolic("MatMulInteger", (x, self.weight_t, self.input_zero_point_u8, self.weight_zero_point),
                        dtype=torch.int32, shape=(*x.shape[:-1], self.out_features))
        y = apply_post_op(self.rescale(acc), self.post_op, self.post_op_args)
        return self.quantize(y, "output") if self.uint8_out else y


class IntegerQuantize(_Requant, OnnxQuantize):
    """:class:`~fxcompress.onnx_forms.OnnxQuantize` with the reference's quantization."""


class IntegerQuantizeProduct(_Requant, OnnxQuantizeProduct):
    """:class:`~fxcompress.onnx_forms.OnnxQuantizeProduct` with the reference's quantization."""


class IntegerAdaptiveAvgPool(_Requant, OnnxAdaptiveAvgPool):
    """Equal windows: exact integer window sums (a float32 sum of codes stays exact below
    2**24, an average times the window size would not), then
    ``* input_scale * (1 / count)`` as the pooling kernel; other sizes the float mean."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (oh, ow), (h, w) = self.output_size, x.shape[2:]
        if h % oh or w % ow:
            return self.quantize(F.adaptive_avg_pool2d(self.dequantize(x, "input"), self.output_size), "output")
        kh, kw = h // oh, w // ow
        codes = x.float() - self.input_zero_point
        if (oh, ow) == (1, 1):
            sums = codes.sum(dim=(2, 3), keepdim=True)
        else:  # a depthwise conv with all-ones weights sums each window exactly
            ones = torch.ones(x.shape[1], 1, kh, kw, dtype=torch.float32)
            sums = F.conv2d(codes, ones, None, (kh, kw), 0, 1, x.shape[1])
        inverse_count = torch.tensor(1.0 / (kh * kw), dtype=torch.float32)
        return self.quantize(sums * self.input_scale * inverse_count, "output")


class IntegerQuantAdd(_Requant, OnnxQuantAdd):
    """:class:`~fxcompress.onnx_forms.OnnxQuantAdd` in the reference's order: one float64 add."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        y = self.add_dequantized(self.dequantize(a, "input"), b, "other")
        return self.quantize(F.relu(y) if self.relu else y, "output")


class IntegerQuantMul(nn.Module):
    """The product's code-pair table (the reference's own, :func:`fxcompress.oplib.arith.mul_uint8`)
    gathered by ``a * 256 + b``: exactly the lowered product."""

    def __init__(self, m: QuantMul) -> None:
        super().__init__()
        qparams = [f(getattr(m, f"{p}_{q}")) for p in ("input", "other", "output")
                   for f, q in ((float, "scale"), (int, "zero_point"))]
        self.register_buffer("table", mul_code_table(*qparams).clone())

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        index = a.to(torch.int32) * 256 + b.to(torch.int32)
        return _symbolic("Gather", (self.table, index), {"axis": 0}, dtype=torch.uint8, shape=index.shape)


#: Lowered class -> its integer twin (classes not listed take their QDQ twin).
INTEGER_FORMS: dict[type, type[nn.Module]] = {
    QuantConvNd: IntegerQuantConv,
    QuantLinear: IntegerQuantLinear,
    Quantize: IntegerQuantize,
    QuantizeProduct: IntegerQuantizeProduct,
    QuantAdaptiveAvgPool2d: IntegerAdaptiveAvgPool,
    QuantAdd: IntegerQuantAdd,
    QuantMul: IntegerQuantMul,
}


def integer_form(module: nn.Module) -> nn.Module | None:
    """The integer twin of a lowered module, or None where it has none (it then takes its QDQ
    twin, :func:`fxcompress.onnx_forms.onnx_form`): circular padding stays QDQ, and so does an
    op computing onnxruntime's arithmetic (``arithmetic="onnxruntime"``: onnxruntime's own
    QLinear kernels compute its QDQ twin exactly)."""
    if getattr(module, "arithmetic", "onednn") == "onnxruntime":
        return None
    twin = next((t for cls, t in INTEGER_FORMS.items() if type(module) is cls or (
        cls is QuantConvNd and isinstance(module, QuantConvNd))), None)
    if twin is None or (isinstance(module, QuantConvNd) and module.padding_mode == "circular"):
        return None
    return twin(module)
