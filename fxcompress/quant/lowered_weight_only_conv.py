"""Weight-only int8 convolutions: the convs a static lowering keeps float, stored as int8 codes.

A layer the lowering keeps float (slower in int8 on this CPU, or no kernel for it) computes
in float32 with its folded int8 weight dequantized. Stored as that float32 weight it takes
four times the bytes of its codes: efficientnet_b0's squeeze-excitation convs, kept float
because a 1x1 int8 conv on a 1x1 input is slower than a float one, were a fifth of its
lowered state. :class:`WeightOnlyConv` stores the int8 codes and one scale per output
channel and computes the float conv with ``codes * scale``:

* eagerly, the dequantized weight is made once and kept in the operator cache
  (:mod:`fxcompress.oplib.cache`: outside the state, rebuilt after any change of the codes
  or scales), so a call costs what the float conv costs and gives its result bit for bit
  (the same float32 weight, the same ``F.conv*`` call as ``nn.Conv*d.forward``);
* under ``torch.compile``, ``torch.export`` and ``torch.jit.trace`` the dequantization is
  traced as ops: inductor's freezing folds it into a constant weight; an exported program
  keeps the int8 codes (without freezing, a compiled model dequantizes on every call).

The lowering makes one for a conv whose folded weights the int8 kernels could take
(symmetric, at most 8 bits, per tensor or per output channel:
:func:`fxcompress.quant.lowering.build.kept_float`); transposed convs stay folded layers and
linears kept float stay ``nn.Linear``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fxcompress import macs
from fxcompress.errors import ConfigError, InputError
from fxcompress.oplib import cache
from fxcompress.quant.lowered_base import LoweredModule, summarize

__all__ = ["WeightOnlyConv"]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class WeightOnlyConv(LoweredModule):
    """A float 1-, 2- or 3-D conv whose weight is stored as int8 codes and per-output-channel
    scales (see the module docstring); float in, float out. The hyper-parameters are
    ``nn.Conv*d``'s (``padding`` an int, a tuple, ``"same"`` or ``"valid"``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int],
                 stride: int | Sequence[int] = 1, padding: int | str | Sequence[int] = 0,
                 dilation: int | Sequence[int] = 1, groups: int = 1, bias: bool = True, *,
                 padding_mode: str = "zeros", spatial_dims: int = 2, backend: str = "x86") -> None:
        super().__init__(backend)
        if spatial_dims not in _CONV:
            raise ConfigError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims!r}")
        padding = tuple(padding) if isinstance(padding, (list, tuple)) else padding  # a config's list
        try:  # torch's own checks and padding arithmetic, on a weightless (meta) twin
            like = getattr(nn, f"Conv{spatial_dims}d")(in_channels, out_channels, kernel_size, stride, padding, dilation,
                                             groups, bias, padding_mode, device="meta")
        except (ValueError, RuntimeError, TypeError) as exc:
            raise ConfigError(f"WeightOnlyConv: {exc}") from exc
        self.spatial_dims, self.in_channels, self.out_channels = spatial_dims, in_channels, out_channels
        self.kernel_size, self.stride, self.dilation = like.kernel_size, like.stride, like.dilation
        self.padding, self.groups, self.padding_mode = like.padding, groups, padding_mode
        self._reversed_padding = list(like._reversed_padding_repeated_twice)  # what nn.Conv*d pads by
        self.register_buffer("weight", torch.zeros(like.weight.shape, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_channels))
        self.register_buffer("bias", torch.zeros(out_channels) if bias else None)

    @classmethod
    def from_float(cls, conv: nn.modules.conv._ConvNd, weight_scale: torch.Tensor, *,
                   backend: str = "x86") -> WeightOnlyConv:
        """Store ``conv``'s weight as int8 codes by ``weight_scale`` (one per output channel):
        exact where the weight already is ``codes * weight_scale`` (a folded layer's)."""
        if not isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            raise ConfigError(f"WeightOnlyConv.from_float needs an nn.Conv1d/2d/3d, got {type(conv).__name__}")
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                conv.groups, conv.bias is not None, padding_mode=conv.padding_mode,
                spatial_dims=len(conv.kernel_size), backend=backend)
        m.load_float_weights(conv, weight_scale)
        return m

    def config(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
                "dilation": list(self.dilation), "groups": self.groups, "bias": self.bias is not None,
                "padding_mode": self.padding_mode, "spatial_dims": self.spatial_dims, "backend": self.backend}

    def dequantized_weight(self) -> torch.Tensor:
        """``codes * scale`` in float32 (``fxcompress.quant.qparams.dequantize``'s arithmetic)."""
        return self.weight.float() * self.weight_scale.view(-1, *([1] * (self.weight.dim() - 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point() or x.dim() not in (self.spatial_dims + 1, self.spatial_dims + 2):
            raise InputError(f"WeightOnlyConv expects a float {self.spatial_dims + 2}-D activation, "
                             f"got {x.dim()}-D {x.dtype}")
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            weight = self.dequantized_weight()  # traced: folded by freezing, codes kept by export
        else:
            entry = cache.per_weight(self.weight, self.weight_scale)
            weight = cache.remember(entry, "dequantized", self.dequantized_weight)
        conv = _CONV[self.spatial_dims]
        if self.padding_mode != "zeros":  # as nn.Conv*d: pad by the mode, then a conv without padding
            x = F.pad(x, self._reversed_padding, mode=self.padding_mode)
            return conv(x, weight.to(x.dtype), self.bias, self.stride, 0, self.dilation, self.groups)
        return conv(x, weight.to(x.dtype), self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        mode = f", padding_mode={self.padding_mode}" if self.padding_mode != "zeros" else ""
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}{mode}, dilation={self.dilation}, groups={self.groups}, bits=8 weights, "
                f"float compute, w_scale={summarize(self.weight_scale)}")


def _count_macs(gm: torch.fx.GraphModule, node: torch.fx.Node) -> dict[str, int]:
    return macs.count_conv(gm, node, gm.get_submodule(str(node.target)).weight.shape)


macs.register_module(WeightOnlyConv, _count_macs)
