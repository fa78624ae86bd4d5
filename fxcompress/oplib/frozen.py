"""What the operators become under ``torch.compile`` with inductor's freezing on.

With ``torch._inductor.config.freezing = True`` (the setting torchao's PT2E flow needs for its
int8 kernels too) inductor treats the model's parameters and buffers as constants. Then a
lowered module's operator call is traced as the code below instead of an opaque call of
:mod:`fxcompress.oplib.library`, so the compiled program calls oneDNN directly, with no
Python between kernels:

* ``qconv`` (2-D): ``fxcompress::prepack_qconv`` of the frozen int8 weight
  (:func:`fxcompress.oplib.impl.prepack_qconv`), which inductor's constant folding runs once
  at compile time, then ``onednn.qconv_pointwise`` with the qparams as literals: the call
  :class:`~fxcompress.oplib.kernels.QConvKernel` makes eagerly, with a weight packed for the
  same input shape, hence the same codes.
* ``qconv_add_`` (a fused residual sum): oneDNN's fused sum writes into the residual, and a
  traced in-place call with a packed (opaque) weight cannot be functionalized; so the conv
  runs to float32 and the sum, post-op and requantization are elementwise ops, in the fused
  kernel's reference arithmetic (:func:`~fxcompress.oplib.arith.add_dequantized`: the sum
  rounded once). The x86 kernel matches it bit for bit on AVX512-VNNI; where its rounding
  differs (AMX) the two are within the contract's one code.
* ``qlinear``: ``onednn.qlinear_prepack`` (folded the same way) and ``onednn.qlinear_pointwise``.
* ``quantize``, ``quantize_product``, ``dequantize``: their arithmetic as elementwise aten
  ops, which inductor fuses with the float ops around them (SiLU, squeeze-excitation
  gates). The formula is :func:`~fxcompress.oplib.arith.quantize_uint8`'s, each step rounded
  to float32 (inductor compiles C++ with ``-ffp-contract=off``: no fused multiply-add), so
  the codes are the same whenever the float input is; an activation inductor computes
  itself (``swish``'s sigmoid) may differ from aten's by an ulp, hence by at most one code.
  A 4-D quantize writes channels-last codes, the layout the convs take.

Everything else (pools, uint8 adds, dynamic and weight-only layers), and every call whose
preconditions do not hold at compile time (the reference backend, weights this CPU's kernels
could overflow on, a conv of a 1-channel input), stays the opaque operator, which computes
as it does eagerly. A dynamic batch is tested (tests/oplib/test_compile_frozen.py). The NaN/Inf check of a graph input's quantize is kept, with
the same message, but raised by the compiled graph as a ``RuntimeError`` (a graph raises
no Python exception type).

The qparams are read once, when the call is traced: like the frozen weights, an edit made
after compiling is not seen until the model is compiled again (``torch._dynamo.reset()``).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch._dynamo  # loaded already: this module is imported while dynamo traces

from fxcompress.oplib import impl
from fxcompress.oplib.arith import _inverse, apply_post_op
from fxcompress.oplib.kernels import (
    _check_qparams, _onednn_post_op, int8_weight_support, supports_qconv, supports_qlinear,
)

__all__ = ["FORMS", "applies", "operator"]


@torch._dynamo.assume_constant_result
def _freezing() -> bool:
    import torch._inductor.config as inductor_config

    return bool(inductor_config.freezing)


def applies() -> bool:
    """Whether a call being traced now takes the forms of this module: compiling (not
    exporting: an exported program keeps the portable operators) with freezing on."""
    return not torch.compiler.is_exporting() and _freezing()


def operator(name: str) -> Callable[..., Any]:
    """What a call of operator ``name`` traced now records: its form here, or the operator."""
    form = FORMS.get(name)
    return form if form is not None and applies() else getattr(torch.ops.fxcompress, name)


@torch._dynamo.assume_constant_result
def _qparams(scale: torch.Tensor, zero_point: torch.Tensor) -> tuple[float, int]:
    return float(scale.item()), int(zero_point.item())


@torch._dynamo.assume_constant_result
def _inverse_qparams(scale: torch.Tensor, zero_point: torch.Tensor) -> tuple[float, int]:
    """``(1 / scale`` rounded to float32 as the kernels compute it``, zero_point)``."""
    return _inverse(float(scale.item())), int(zero_point.item())


@torch._dynamo.assume_constant_result
def _conv_runs_kernel(weight: torch.Tensor, shape: tuple[int, ...], stride: tuple[int, ...],
                      padding: tuple[int, ...], dilation: tuple[int, ...], groups: int, post_op: str,
                      qparams: tuple[float, int, float | None, int]) -> bool:
    xs, xzp, os_, ozp = qparams
    return bool(supports_qconv(weight.shape, shape, stride=stride, padding=padding, dilation=dilation,
                               groups=groups, post_op=post_op) and int8_weight_support(weight)
                and _check_qparams(xs, xzp, "input") and (os_ is None or _check_qparams(os_, ozp, "output")))


@torch._dynamo.assume_constant_result
def _linear_runs_kernel(weight: torch.Tensor, post_op: str) -> bool:
    return bool(supports_qlinear(weight.shape[1], post_op) and int8_weight_support(weight))


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, activation: str = "none",
             activation_args: Sequence[float] = (), guard: str = "") -> torch.Tensor:
    if guard and x.is_floating_point():
        # A compiled graph cannot raise fxcompress's InputError from a data-dependent test:
        # the same check and message, raised by the graph as a RuntimeError.
        torch._assert_async(torch.isfinite(x.sum()), impl.nonfinite_input_message(guard))
    inverse, zp = _inverse_qparams(scale, zero_point)
    # Channels-last codes for 4-D inputs (the layout the int8 convs take: a contiguous 3-channel
    # image would be reordered inside the first conv); the transposition fuses into the kernel.
    layout = torch.channels_last if x.dim() == 4 else impl.quantize_layout(x)
    return _quantized(apply_post_op(x.float(), activation, activation_args), inverse, zp, layout)


def _quantized(y: torch.Tensor, inverse: float, zero_point: int, layout: torch.memory_format) -> torch.Tensor:
    """``clamp(round(y * inverse + zero_point), 0, 255)``, each step in float32, ties to even."""
    codes = torch.round(y * inverse + float(zero_point)).clamp_(0.0, 255.0).to(torch.uint8)
    return codes.contiguous(memory_format=layout)


def quantize_product(x: torch.Tensor, gains: torch.Tensor, scale: torch.Tensor,
                     zero_point: torch.Tensor) -> torch.Tensor:
    inverse, zp = _inverse_qparams(scale, zero_point)
    y = x.float() * gains.float()
    return _quantized(y, inverse, zp, impl.quantize_layout(x) if y.shape == x.shape else torch.contiguous_format)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    s, zp = _qparams(scale, zero_point)
    return (q.to(torch.float32) - float(zp)) * s


def qconv(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
          input_scale: torch.Tensor, input_zero_point: torch.Tensor, output_scale: torch.Tensor | None,
          output_zero_point: torch.Tensor | None, stride: Sequence[int], padding: Sequence[int],
          dilation: Sequence[int], groups: int, pre_padding: Sequence[int] = (), padding_mode: str = "zeros",
          post_op: str = "none", post_op_args: Sequence[float] = (), use_kernels: bool = True) -> torch.Tensor:
    opaque = (x, weight, weight_scale, bias, input_scale, input_zero_point, output_scale, output_zero_point, stride,
              padding, dilation, groups, pre_padding, padding_mode, post_op, post_op_args, use_kernels)
    # A 1-channel input is contiguous and channels-last at once, and inductor's lowering of the
    # oneDNN conv may then expect a contiguous output where oneDNN writes channels-last (seen
    # with a dynamic batch: its run-time layout check fails). Such a conv stays opaque.
    if not use_kernels or x.dim() != 4 or x.shape[1] == 1:
        return torch.ops.fxcompress.qconv(*opaque)
    xs, xzp = _qparams(input_scale, input_zero_point)
    os_, ozp = _qparams(output_scale, output_zero_point) if output_scale is not None else (None, 0)
    x = impl._pad_codes(x, pre_padding, padding_mode, xzp)
    geometry = (tuple(stride), tuple(padding), tuple(dilation))
    if not _conv_runs_kernel(weight, (1, *x.shape[1:]), *geometry, groups, post_op, (xs, xzp, os_, ozp)):
        return torch.ops.fxcompress.qconv(*opaque)
    # Packed for the call's shape, as the eager kernel is.
    packed = torch.ops.fxcompress.prepack_qconv(weight, weight_scale, xs, xzp, stride, padding, dilation, groups,
                                                list(x.shape))
    name, scalars, algorithm = _onednn_post_op(post_op, post_op_args)
    uint8_out = os_ is not None
    return torch.ops.onednn.qconv_pointwise.default(
        x, xs, xzp, packed, weight_scale, torch.zeros(weight.shape[0], dtype=torch.int64), bias, list(stride),
        list(padding), list(dilation), groups, os_ if uint8_out else 1.0, ozp, torch.uint8 if uint8_out else
        torch.float32, name, scalars, algorithm)


def qconv_add_(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
               input_scale: torch.Tensor, input_zero_point: torch.Tensor, output_scale: torch.Tensor | None,
               output_zero_point: torch.Tensor | None, residual: torch.Tensor, residual_scale: torch.Tensor | None,
               residual_zero_point: torch.Tensor | None, stride: Sequence[int], padding: Sequence[int],
               dilation: Sequence[int], groups: int, pre_padding: Sequence[int] = (), padding_mode: str = "zeros",
               post_op: str = "none", post_op_args: Sequence[float] = (), use_kernels: bool = True) -> None:
    # The fused sum, unfused (see the module docstring): conv to float32, then elementwise.
    opaque = (x, weight, weight_scale, bias, input_scale, input_zero_point, output_scale, output_zero_point, residual,
              residual_scale, residual_zero_point, stride, padding, dilation, groups, pre_padding, padding_mode,
              post_op, post_op_args, use_kernels)
    if not use_kernels or residual.dim() != 4:
        torch.ops.fxcompress.qconv_add_(*opaque)
        return
    y = qconv(x, weight, weight_scale, bias, input_scale, input_zero_point, None, None, stride, padding, dilation,
              groups, pre_padding, padding_mode, "none", (), use_kernels)
    if output_scale is None:  # a float32 output, and a float32 residual
        residual.copy_(apply_post_op(y + residual, post_op, post_op_args))
        return
    rs, rzp = _qparams(residual_scale, residual_zero_point)
    inverse, ozp = _inverse_qparams(output_scale, output_zero_point)
    summed = (y.to(torch.float64) + (residual.to(torch.float64) - float(rzp)) * rs).to(torch.float32)
    residual.copy_(_quantized(apply_post_op(summed, post_op, post_op_args), inverse, ozp, torch.channels_last))


def qlinear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
            input_scale: torch.Tensor, input_zero_point: torch.Tensor, output_scale: torch.Tensor | None,
            output_zero_point: torch.Tensor | None, post_op: str = "none", post_op_args: Sequence[float] = (),
            use_kernels: bool = True) -> torch.Tensor:
    opaque = (x, weight, weight_scale, bias, input_scale, input_zero_point, output_scale, output_zero_point,
              post_op, post_op_args, use_kernels)
    if not use_kernels or not _linear_runs_kernel(weight, post_op):
        return torch.ops.fxcompress.qlinear(*opaque)
    xs, xzp = _qparams(input_scale, input_zero_point)
    os_, ozp = _qparams(output_scale, output_zero_point) if output_scale is not None else (None, 0)
    name, scalars, algorithm = _onednn_post_op(post_op, post_op_args)
    uint8_out = os_ is not None
    rows = x.reshape(-1, x.shape[-1])
    y = torch.ops.onednn.qlinear_pointwise.default(
        rows, xs, xzp, torch.ops.onednn.qlinear_prepack(weight, None), weight_scale,
        torch.zeros(weight.shape[0], dtype=torch.int64), bias, os_ if uint8_out else 1.0, ozp,
        torch.uint8 if uint8_out else torch.float32, name, scalars, algorithm)
    return y.reshape(*x.shape[:-1], weight.shape[0])


#: Operator name -> its form under freezing (the operators not named stay opaque).
FORMS: dict[str, Callable[..., Any]] = {
    "quantize": quantize, "quantize_product": quantize_product, "dequantize": dequantize, "qconv": qconv,
    "qconv_add_": qconv_add_, "qlinear": qlinear,
}
