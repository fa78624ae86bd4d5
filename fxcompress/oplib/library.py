"""The ``torch.ops.fxcompress`` operators: schemas, CPU implementations, fake implementations.

Each operator is one lowered module's computation with every parameter explicit: tensors
(codes, int8 weights, float32 scales, int32 zero points, as the module stores them) and
constants (geometry, post-op names, ``use_kernels``). Nothing about them is data-dependent
at trace time, so ``torch.compile`` treats them as opaque calls (inductor fuses the float
ops around them; with freezing on, the lowered modules trace most of them as direct oneDNN
calls instead: :mod:`fxcompress.oplib.frozen`) and ``torch.export`` records them by name:
an exported program needs ``import fxcompress.oplib`` to run, and nothing else from
fxcompress.

The fake implementations give the exact output shape, dtype and strides the CPU
implementation returns (:mod:`fxcompress.oplib.impl` fixes the layouts), with symbolic
batch sizes. ``qconv_add_`` writes into its ``residual`` argument (``Tensor(a!)``): under
``torch.compile`` it is functionalized and inductor re-inplaces it where nothing reads
the residual afterwards.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from fxcompress.oplib import impl, impl_onnxruntime

__all__ = ["NAMESPACE", "SCHEMAS", "IMPLEMENTATIONS"]

NAMESPACE = "fxcompress"
_CONV_TAIL = ("int[] stride, int[] padding, int[] dilation, int groups, int[] pre_padding, str padding_mode, "
              "str post_op, float[] post_op_args, bool use_kernels")
_QPARAMS_IO = ("Tensor input_scale, Tensor input_zero_point, Tensor? output_scale, Tensor? output_zero_point")
#: Operator name -> schema (arguments and result).
SCHEMAS: dict[str, str] = {
    "quantize": "(Tensor x, Tensor scale, Tensor zero_point, str activation, float[] activation_args, "
                "str guard) -> Tensor",
    "quantize_product": "(Tensor x, Tensor gains, Tensor scale, Tensor zero_point) -> Tensor",
    "dequantize": "(Tensor q, Tensor scale, Tensor zero_point) -> Tensor",
    "qconv": f"(Tensor x, Tensor weight, Tensor weight_scale, Tensor? bias, {_QPARAMS_IO}, {_CONV_TAIL}) -> Tensor",
    "qconv_add_": f"(Tensor x, Tensor weight, Tensor weight_scale, Tensor? bias, {_QPARAMS_IO}, "
                  f"Tensor(a!) residual, Tensor? residual_scale, Tensor? residual_zero_point, {_CONV_TAIL}) -> ()",
    "qlinear": f"(Tensor x, Tensor weight, Tensor weight_scale, Tensor? bias, {_QPARAMS_IO}, str post_op, "
               f"float[] post_op_args, bool use_kernels) -> Tensor",
    "max_pool2d": "(Tensor x, int[] kernel_size, int[] stride, int[] padding, int[] dilation, bool ceil_mode, "
                  "bool use_kernels) -> Tensor",
    "adaptive_avg_pool2d": "(Tensor x, Tensor input_scale, Tensor input_zero_point, Tensor output_scale, "
                           "Tensor output_zero_point, int[] output_size, bool use_kernels) -> Tensor",
    "add": "(Tensor a, Tensor b, Tensor a_scale, Tensor a_zero_point, Tensor b_scale, Tensor b_zero_point, "
           "Tensor output_scale, Tensor output_zero_point, bool relu, bool use_kernels) -> Tensor",
    "mul": "(Tensor a, Tensor b, Tensor a_scale, Tensor a_zero_point, Tensor b_scale, Tensor b_zero_point, "
           "Tensor output_scale, Tensor output_zero_point) -> Tensor",
    "dynamic_linear": "(Tensor x, Tensor weight, Tensor weight_scale, Tensor? bias, str granularity, "
                      "bool use_kernels, int token_zero_point=128) -> Tensor",
    "weight_only_linear": "(Tensor x, Tensor weight, Tensor scale, Tensor? zero_point, Tensor? bias, int bits, "
                          "int in_features, str compute_dtype, bool cache_dequantized, bool use_kernels) -> Tensor",
    "weight_only_embedding": "(Tensor indices, Tensor weight, Tensor scale, Tensor? zero_point, int bits, "
                             "int embedding_dim) -> Tensor",
    # onnxruntime's QLinear arithmetic (fxcompress.oplib.arith_onnxruntime): the default ops' arguments
    "quantize_onnxruntime": "(Tensor x, Tensor scale, Tensor zero_point, str activation, float[] activation_args, "
                            "str guard) -> Tensor",
    "quantize_product_onnxruntime": "(Tensor x, Tensor gains, Tensor scale, Tensor zero_point) -> Tensor",
    "qconv_onnxruntime": f"(Tensor x, Tensor weight, Tensor weight_scale, Tensor? bias, {_QPARAMS_IO}, "
                         f"{_CONV_TAIL}) -> Tensor",
    "add_onnxruntime": "(Tensor a, Tensor b, Tensor a_scale, Tensor a_zero_point, Tensor b_scale, "
                       "Tensor b_zero_point, Tensor output_scale, Tensor output_zero_point, bool relu, "
                       "bool use_kernels) -> Tensor",
    "mul_onnxruntime": "(Tensor a, Tensor b, Tensor a_scale, Tensor a_zero_point, Tensor b_scale, "
                       "Tensor b_zero_point, Tensor output_scale, Tensor output_zero_point) -> Tensor",
    "adaptive_avg_pool2d_onnxruntime": "(Tensor x, Tensor input_scale, Tensor input_zero_point, Tensor output_scale, "
                                       "Tensor output_zero_point, int[] output_size, bool use_kernels) -> Tensor",
    # oneDNN's packed conv weight (an opaque tensor), made under torch.compile with freezing
    # (:mod:`fxcompress.oplib.frozen`) and folded into a constant there; never in a saved program.
    "prepack_qconv": "(Tensor weight, Tensor weight_scale, float input_scale, int input_zero_point, int[] stride, "
                     "int[] padding, int[] dilation, int groups, int[]? input_shape) -> Tensor",
}

#: Operator name -> its CPU implementation (:mod:`.impl`; onnxruntime's arithmetic: :mod:`.impl_onnxruntime`).
IMPLEMENTATIONS: dict[str, Callable] = {
    name: getattr(impl_onnxruntime if name.endswith("_onnxruntime") else impl, name) for name in SCHEMAS}

_LIBRARY = torch.library.Library(NAMESPACE, "DEF")
for _name, _schema in SCHEMAS.items():
    _LIBRARY.define(_name + _schema)
    _LIBRARY.impl(_name, IMPLEMENTATIONS[_name], "CPU")


def _empty(shape: Sequence, dtype: torch.dtype, like: torch.Tensor) -> torch.Tensor:
    dims = len(shape)
    if dims == 4:
        return like.new_empty(shape, dtype=dtype).contiguous(memory_format=torch.channels_last)
    if dims == 5:
        return like.new_empty(shape, dtype=dtype).contiguous(memory_format=torch.channels_last_3d)
    return like.new_empty(shape, dtype=dtype)


def _fake(name: str):
    return torch.library.register_fake(f"{NAMESPACE}::{name}")


@_fake("quantize")
def _quantize_fake(x, scale, zero_point, activation, activation_args, guard):
    return torch.empty(x.shape, dtype=torch.uint8, device=x.device, memory_format=impl.quantize_layout(x))


torch.library.register_fake(f"{NAMESPACE}::quantize_onnxruntime")(_quantize_fake)


@_fake("quantize_product")
def _quantize_product_fake(x, gains, scale, zero_point):
    shape = torch.broadcast_shapes(x.shape, gains.shape)
    layout = impl.quantize_layout(x) if shape == x.shape else torch.contiguous_format
    return torch.empty(shape, dtype=torch.uint8, device=x.device, memory_format=layout)


torch.library.register_fake(f"{NAMESPACE}::quantize_product_onnxruntime")(_quantize_product_fake)


@_fake("dequantize")
def _dequantize_fake(q, scale, zero_point):
    return torch.empty_like(q, dtype=torch.float32)


def _conv_shape(x, weight, stride, padding, dilation, pre_padding) -> list:
    spatial = list(x.shape[2:])
    for i in range(len(pre_padding) // 2):
        spatial[-1 - i] = spatial[-1 - i] + pre_padding[2 * i] + pre_padding[2 * i + 1]
    kernel = weight.shape[2:]
    out = [(spatial[i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1
           for i in range(len(kernel))]
    return [x.shape[0], weight.shape[0], *out]


def _conv_out(x, weight, output_scale, stride, padding, dilation, pre_padding) -> torch.Tensor:
    shape = _conv_shape(x, weight, stride, padding, dilation, pre_padding)
    dtype = torch.float32 if output_scale is None else torch.uint8
    if len(shape) == 3:  # the 1-D kernel's (N, L, C) strides
        return x.new_empty((shape[0], shape[2], shape[1]), dtype=dtype).transpose(1, 2)
    return _empty(shape, dtype, x)


@_fake("qconv")
def _qconv_fake(x, weight, weight_scale, bias, input_scale, input_zero_point, output_scale, output_zero_point,
                stride, padding, dilation, groups, pre_padding, padding_mode, post_op, post_op_args, use_kernels):
    return _conv_out(x, weight, output_scale, stride, padding, dilation, pre_padding)


torch.library.register_fake(f"{NAMESPACE}::qconv_onnxruntime")(_qconv_fake)


@_fake("qconv_add_")
def _qconv_add_fake(x, weight, weight_scale, bias, input_scale, input_zero_point, output_scale, output_zero_point,
                    residual, residual_scale, residual_zero_point, stride, padding, dilation, groups, pre_padding,
                    padding_mode, post_op, post_op_args, use_kernels):
    return None


@_fake("qlinear")
def _qlinear_fake(x, weight, weight_scale, bias, input_scale, input_zero_point, output_scale, output_zero_point,
                  post_op, post_op_args, use_kernels):
    dtype = torch.float32 if output_scale is None else torch.uint8
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=dtype)


@_fake("max_pool2d")
def _max_pool2d_fake(x, kernel_size, stride, padding, dilation, ceil_mode, use_kernels):
    shape = F.max_pool2d(torch.empty_like(x, dtype=torch.float32), kernel_size, stride, padding, dilation,
                         ceil_mode).shape
    return _empty(shape, torch.uint8, x)


@_fake("adaptive_avg_pool2d")
def _adaptive_avg_pool2d_fake(x, input_scale, input_zero_point, output_scale, output_zero_point, output_size,
                              use_kernels):
    return _empty((x.shape[0], x.shape[1], *output_size), torch.uint8, x)


@_fake("add")
def _add_fake(a, b, a_scale, a_zero_point, b_scale, b_zero_point, output_scale, output_zero_point, relu,
              use_kernels):
    return _empty(torch.broadcast_shapes(a.shape, b.shape), torch.uint8, a)


torch.library.register_fake(f"{NAMESPACE}::add_onnxruntime")(_add_fake)
torch.library.register_fake(f"{NAMESPACE}::adaptive_avg_pool2d_onnxruntime")(_adaptive_avg_pool2d_fake)


@_fake("mul")
def _mul_fake(a, b, a_scale, a_zero_point, b_scale, b_zero_point, output_scale, output_zero_point):
    return _empty(torch.broadcast_shapes(a.shape, b.shape), torch.uint8, a)


torch.library.register_fake(f"{NAMESPACE}::mul_onnxruntime")(_mul_fake)


@_fake("dynamic_linear")
def _dynamic_linear_fake(x, weight, weight_scale, bias, granularity, use_kernels, token_zero_point=128):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@_fake("weight_only_linear")
def _weight_only_linear_fake(x, weight, scale, zero_point, bias, bits, in_features, compute_dtype,
                             cache_dequantized, use_kernels):
    return x.new_empty((*x.shape[:-1], scale.shape[0]))


@_fake("prepack_qconv")
def _prepack_qconv_fake(weight, weight_scale, input_scale, input_zero_point, stride, padding, dilation, groups,
                        input_shape):
    # The logical shape (inductor's conv lowering reads it) and the strides oneDNN's opaque
    # tensor reports, (1, 0, ...): compiled graphs check them where the op runs at run time.
    return weight.new_empty_strided(weight.shape, (1,) + (0,) * (weight.dim() - 1))


@_fake("weight_only_embedding")
def _weight_only_embedding_fake(indices, weight, scale, zero_point, bits, embedding_dim):
    return scale.new_empty((*indices.shape, embedding_dim))
