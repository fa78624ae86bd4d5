"""Lowered linears with float activations: dynamic int8 and weight-only low-bit.

:class:`DynamicQuantLinear` quantizes activations at run time to uint8, per token (a scale
per row) or per tensor, both through oneDNN's qlinear. :class:`WeightOnlyLinear`
stores 8/4/2-bit weights packed (two 4-bit or four 2-bit codes per byte) and keeps them
packed: the int4/int8 kernels (bf16 activations) run where they are safe and faster;
elsewhere the weight is dequantized (once, cached, unless ``cache_dequantized=False``)
and multiplied in fp32 or bf16.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fxcompress import macs
from fxcompress.errors import ConfigError, InputError, LoweringError
from fxcompress.quant.kernels import (
    Support, int8_weight_support, supports_int4pack_mm, supports_int8pack_mm, supports_qlinear,
)
from fxcompress.quant.lowered_base import LoweredModule, run_op, summarize
from fxcompress.quant.qparams import pack_int, unpack_int
from fxcompress.oplib.impl import WEIGHT_ONLY_KERNEL_MAX_ROWS

__all__ = ["GRANULARITIES", "DEFAULT_GRANULARITY", "DynamicQuantLinear", "WeightOnlyLinear"]

GRANULARITIES = ("per_token", "per_tensor")
#: Whole-model benchmarks decide it (benchmarks/dynamic.py, benchmarks/minilm.py; AMD EPYC with
#: AVX512-VNNI, 1 thread): per token is the more accurate everywhere (pretrained MiniLM cosine
#: 0.99737 vs 0.99319, vit_b_16 0.99953 vs 0.99912) at the same speed (within 4% either way).
DEFAULT_GRANULARITY = "per_token"
_COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Above this many rows the weight-only kernels lose to a bf16 matmul (fxcompress.oplib.impl).
_KERNEL_MAX_ROWS = WEIGHT_ONLY_KERNEL_MAX_ROWS
_REFERENCE_ONLY = Support(False, "backend='reference' was requested")


def _check_float(x: torch.Tensor, in_features: int, where: str) -> None:
    if not x.is_floating_point() or x.dim() < 1 or x.shape[-1] != in_features:
        raise InputError(f"{where} expects a float tensor with {in_features} features in the last "
                         f"dim, got {x.dtype} {tuple(x.shape)}")


class DynamicQuantLinear(LoweredModule):
    """int8 per-channel weights; activations quantized at run time; float in, float out.

    ``per_token``: uint8 codes with a scale per row and ``token_zero_point`` (1..254) for
    every row, so that no row is clipped and the 256 codes are shared between the negative
    and positive sides as the layer's inputs need (``quantize_dynamic`` picks it from the
    example inputs: small after GELU, near 128 after a LayerNorm); exact int32 GEMM
    (oneDNN qlinear with the weight scales fused; the rows' scales and the bias applied
    after, in one pass). ``per_tensor``: asymmetric uint8 for the whole input, oneDNN
    qlinear with bias fused. Per token is the default (as in ``quantize_dynamic``): more
    accurate on transformer activations (outlier tokens do not widen everyone's scale) at
    the same speed. Their speed on real models is measured in ``benchmarks/minilm.py``
    and ``benchmarks/dynamic.py``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 granularity: str = DEFAULT_GRANULARITY, token_zero_point: int = 128,
                 backend: str = "x86") -> None:
        super().__init__(backend)
        if granularity not in GRANULARITIES:
            raise ConfigError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if isinstance(token_zero_point, bool) or not isinstance(token_zero_point, int) \
                or not 1 <= token_zero_point <= 254:
            raise ConfigError(f"token_zero_point must be an int in 1..254 (codes on both sides of it), "
                              f"got {token_zero_point!r}")
        self.in_features, self.out_features, self.granularity = in_features, out_features, granularity
        self.token_zero_point = token_zero_point
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear, weight_scale: torch.Tensor | None = None, *,
                   granularity: str = DEFAULT_GRANULARITY, token_zero_point: int = 128,
                   backend: str = "x86") -> DynamicQuantLinear:
        """Quantize ``linear``'s weight symmetric per output channel (``amax / 127`` by default)."""
        if not isinstance(linear, nn.Linear):
            raise LoweringError(f"DynamicQuantLinear.from_float needs an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach().float()
        if weight_scale is None:
            weight_scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        scale = torch.as_tensor(weight_scale, dtype=torch.float32).flatten()
        if scale.shape != (linear.out_features,) or not bool((scale > 0).all()):
            raise LoweringError(f"weight_scale must hold {linear.out_features} positive values")
        m = cls(linear.in_features, linear.out_features, linear.bias is not None,
                granularity=granularity, token_zero_point=token_zero_point, backend=backend)
        m.weight.copy_(torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8))
        m.weight_scale.copy_(scale)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach())
        return m

    def config(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "granularity": self.granularity,
                "token_zero_point": self.token_zero_point, "backend": self.backend}

    def kernel_support(self) -> Support:
        """Whether the integer kernel runs, or why the reference path is used."""
        if self.backend == "reference":
            return _REFERENCE_ONLY
        # Both granularities run oneDNN's qlinear (uint8 or int8 rows): exact with these
        # weights on every CPU with VNNI/AMX, with weights of at most 7 bits on AVX2.
        return supports_qlinear(self.in_features) and int8_weight_support(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_float(x, self.in_features, "DynamicQuantLinear")
        return run_op("dynamic_linear", x, self.weight, self.weight_scale, self.bias, self.granularity,
                      self.use_kernels, self.token_zero_point)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits=8, "
                f"activations=dynamic {self.granularity}"
                f"{f' (zero point {self.token_zero_point})' if self.granularity == 'per_token' else ''}, w_scale={summarize(self.weight_scale)}, "
                f"backend={self.backend}")


class WeightOnlyLinear(LoweredModule):
    """Weight-only quantized linear: ``bits`` 8, 4 or 2 with per-group scales; float in/out.

    8-bit: int8 symmetric, ``w = q * scale``. 4/2-bit: unsigned codes with integer zero
    points, ``w = (q - zero_point) * scale``, packed little end first into uint8 (see
    ``qparams.pack_int``). Groups run along ``in_features`` (``group_size`` columns share a
    scale). ``compute_dtype`` is the matmul dtype; the output has the input's dtype.
    ``cache_dequantized`` keeps the dequantized weight for the reference path (speed of a
    ``compute_dtype`` linear, its memory at run time; the state stays packed).
    Kernels (only with ``compute_dtype="bfloat16"``): int4 via
    ``_weight_int4pack_mm_for_cpu`` (group 32..256, N % 16 == 0) and per-channel int8 via
    ``_weight_int8pack_mm`` (K % 16 == 0), each for few rows only, where they win.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, bits: int = 4,
                 group_size: int | None = 128, compute_dtype: str = "bfloat16",
                 cache_dequantized: bool = True, backend: str = "x86") -> None:
        super().__init__(backend)
        if bits not in (8, 4, 2):
            raise ConfigError(f"weight-only quantization supports bits 8, 4 or 2, got {bits!r}")
        # A group longer than a row is one group per row (small layers under a global default).
        group = in_features if group_size is None else min(int(group_size), in_features)
        if group < 1 or in_features % group:
            raise ConfigError(f"group_size must divide in_features={in_features}, got {group_size!r} "
                              f"(use a divisor such as 32/64/128, or None for one group per row)")
        if compute_dtype not in _COMPUTE_DTYPES:
            raise ConfigError(f"compute_dtype must be one of {tuple(_COMPUTE_DTYPES)}, got {compute_dtype!r}")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size, self.compute_dtype = group, compute_dtype
        self.cache_dequantized = bool(cache_dequantized)
        if bits == 8:
            self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        else:
            packed_cols = -(-in_features * bits // 8)
            self.register_buffer("weight", torch.zeros(out_features, packed_cols, dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(out_features, in_features // group))
        self.register_buffer("zero_point", None if bits == 8 else
                             torch.zeros(out_features, in_features // group, dtype=torch.uint8))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int = 4, group_size: int | None = 128, *,
                   compute_dtype: str = "bfloat16", cache_dequantized: bool = True,
                   backend: str = "x86") -> WeightOnlyLinear:
        """Quantize ``linear``'s weight per group: absmax (8-bit) or min/max incl. 0 (4/2-bit)."""
        if not isinstance(linear, nn.Linear):
            raise LoweringError(f"WeightOnlyLinear.from_float needs an nn.Linear, got {type(linear).__name__}")
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, bits=bits,
                group_size=group_size, compute_dtype=compute_dtype,
                cache_dequantized=cache_dequantized, backend=backend)
        n, k, g = m.out_features, m.in_features, m.group_size
        w = linear.weight.detach().float().view(n, k // g, g)
        if bits == 8:
            scale = w.abs().amax(dim=-1).clamp_min(1e-12) / 127.0
            m.weight.copy_(torch.round(w / scale[..., None]).clamp_(-127, 127).view(n, k).to(torch.int8))
        else:
            qmax = (1 << bits) - 1
            lo, hi = w.amin(dim=-1).clamp(max=0.0), w.amax(dim=-1).clamp(min=0.0)
            scale = ((hi - lo) / qmax).clamp_min(1e-12)  # the range holds 0: zero is exact
            zp = torch.round(-lo / scale).clamp_(0, qmax)
            codes = (torch.round(w / scale[..., None]) + zp[..., None]).clamp_(0, qmax)
            m.weight.copy_(pack_int(codes.view(n, k).to(torch.uint8), bits))
            m.zero_point.copy_(zp.to(torch.uint8))
        m.scale.copy_(scale)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach())
        return m

    def config(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "bits": self.bits, "group_size": self.group_size,
                "compute_dtype": self.compute_dtype, "cache_dequantized": self.cache_dequantized,
                "backend": self.backend}

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float ``(out_features, in_features)`` weight the stored codes represent."""
        n, k, g = self.out_features, self.in_features, self.group_size
        if self.bits == 8:
            w = self.weight.to(dtype).view(n, k // g, g)
        else:
            codes = unpack_int(self.weight, self.bits, (n, k), signed=False).to(dtype).view(n, k // g, g)
            w = codes.sub_(self.zero_point.to(dtype)[..., None])
        return w.mul_(self.scale.to(dtype)[..., None]).view(n, k)

    def kernel_support(self, rows: int = 1) -> Support:
        """Whether an input of ``rows`` rows (product of leading dims) runs a kernel, or why not."""
        if self.backend == "reference":
            return _REFERENCE_ONLY
        if self.compute_dtype != "bfloat16":
            return Support(False, "the weight-only kernels are fast only with compute_dtype='bfloat16'")
        if self.bits == 2:
            return Support(False, "there is no 2-bit kernel")
        if self.bits == 4:
            support = supports_int4pack_mm(self.out_features, self.in_features, self.group_size,
                                           torch.bfloat16)
        else:
            support = supports_int8pack_mm(self.in_features, torch.bfloat16)
            if support and self.group_size != self.in_features:
                support = Support(False, "int8pack_mm takes one scale per row (group_size=None)")
        if support and rows > _KERNEL_MAX_ROWS:
            return Support(False, f"for more than {_KERNEL_MAX_ROWS} rows the dequantized bf16 matmul is faster")
        return support

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_float(x, self.in_features, "WeightOnlyLinear")
        return run_op("weight_only_linear", x, self.weight, self.scale, self.zero_point, self.bias, self.bits,
                      self.in_features, self.compute_dtype, self.cache_dequantized, self.use_kernels)

    def extra_repr(self) -> str:
        zp = "" if self.zero_point is None else ", zero_point=uint8"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, scale={summarize(self.scale)}{zp}, "
                f"compute_dtype={self.compute_dtype}, backend={self.backend}")


def _count_linear_macs(gm: torch.fx.GraphModule, node: torch.fx.Node) -> dict[str, int]:
    return macs.count_linear(gm, node, gm.get_submodule(str(node.target)).in_features)


# Registered here, next to the classes: whichever pass creates them, their MACs count.
macs.register_module(DynamicQuantLinear, _count_linear_macs)
macs.register_module(WeightOnlyLinear, _count_linear_macs)
