"""Ranges for the one requantization the QDQ form can add: a conv's raw output, where
fxcompress's lowered conv does more before it requantizes (or does not requantize at all).

A lowered conv may add a fused residual (``post_op(conv(x) + residual)``), apply a post-op
onnxruntime cannot fold into its int8 conv (SiLU, hardswish, ...), or return float32 (a pool
or a float op follows), and requantize once at the end, if at all. onnxruntime fuses
``DQ -> Conv -> Q`` into ``QLinearConv`` only where the conv's output itself is quantized, so
it runs such convs in float (exact, slow: 8 of resnet18's 20 convs). Given calibration data,
:func:`conv_output_ranges` measures each such conv's raw float output on it and gives
uint8 qparams covering its range and zero; the QDQ twin then writes ``Conv -> Q -> DQ`` before
the residual add and post-op, which onnxruntime runs as ``QLinearConv`` (+ ``QLinearAdd``).
That extra rounding is not in fxcompress's model: outputs move by up to half a code of the new
scale there (measured: benchmarks/deploy.py, column "QDQ calibrated").
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from fxcompress.errors import ExportError
from fxcompress.quant.lowered import QuantConvNd

__all__ = ["conv_output_ranges", "needs_requantization"]

#: Post-ops onnxruntime folds into the ``Q`` after a conv (a uint8 range starting at zero clips like ReLU).
_FOLDED_POST_OPS = ("none", "relu")

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def needs_requantization(m: nn.Module) -> bool:
    """Whether onnxruntime would run ``m``'s QDQ form as a float conv: a fused residual, a
    post-op it does not fold, or a float32 output."""
    return isinstance(m, QuantConvNd) and (m.residual or m.output != "uint8" or m.post_op not in _FOLDED_POST_OPS)


def _float_conv(m: QuantConvNd, codes: torch.Tensor) -> torch.Tensor:
    """The conv's raw output (before residual and post-op), in float (dequantized input and weight)."""
    x = (codes.float() - m.input_zero_point.float()) * m.input_scale.float()
    if m.pre_padding:
        x = F.pad(x, list(m.pre_padding)) if m.padding_mode == "zeros" else F.pad(x, list(m.pre_padding),
                                                                                  mode=m.padding_mode)
    w = m.weight.float() * m.weight_scale.float().reshape(-1, *([1] * (m.weight.dim() - 1)))
    return _CONV[m.spatial_dims](x, w, None if m.bias is None else m.bias.float(), m.stride, m.padding,
                                 m.dilation, m.groups)


def conv_output_ranges(model: nn.Module, calibration_data: Iterable[Any], args: tuple, kwargs: dict
                         ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``path -> (scale, zero_point)`` (float32 and uint8 scalars) of the raw output of every conv
    of ``model`` that :func:`needs_requantization`, over ``calibration_data`` (batches as
    ``fxcompress.run`` takes them, labelled pairs included: :func:`fxcompress.quant.calibration.batch_inputs`
    checks each against the example inputs ``args`` / ``kwargs``). Adds forward hooks to ``model``
    for the run and removes them (call it on a copy: :func:`fxcompress.onnx_export._twin` does)."""
    from fxcompress.quant.calibration import batch_inputs

    convs = {path: m for path, m in model.named_modules() if needs_requantization(m)}
    lo = dict.fromkeys(convs, 0.0)
    hi = dict.fromkeys(convs, 0.0)

    def hook(path: str):
        def record(module: nn.Module, args: tuple) -> None:
            y = _float_conv(module, args[0])
            lo[path], hi[path] = min(lo[path], y.min().item()), max(hi[path], y.max().item())
        return record

    handles = [m.register_forward_pre_hook(hook(path)) for path, m in convs.items()]
    seen = 0
    try:
        with torch.inference_mode():
            for batch in calibration_data:
                b_args, b_kwargs = batch_inputs(batch, seen, args, kwargs)
                model(*b_args, **b_kwargs)
                seen += 1
    finally:
        for h in handles:
            h.remove()
    if seen == 0:
        raise ExportError("calibration_data is empty: give at least one batch of inputs")
    ranges = {}
    for path in convs:
        scale = (hi[path] - lo[path]) / 255.0 or 1.0
        zero_point = min(255, max(0, round(-lo[path] / scale)))
        ranges[path] = (torch.tensor(scale, dtype=torch.float32), torch.tensor(zero_point, dtype=torch.uint8))
    return ranges
