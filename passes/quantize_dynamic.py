"""``quantize_dynamic``: int8 weights, activations quantized at run time (MLPs, transformers)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from fxcompress.capture import propagate_shapes
from fxcompress.errors import ConfigError
from fxcompress.ops import Kind, describe
from fxcompress.pass_base import Pass, PassContext, PassResult, check_choice
from fxcompress.quant.kept_whole import float_leaves
from fxcompress.quant.lowered_attention import QuantMultiheadAttention
from fxcompress.quant.lowered_base import LoweredModule
from fxcompress.quant.lowered_linear import DEFAULT_GRANULARITY, GRANULARITIES, DynamicQuantLinear
from fxcompress.quant.lowering import check_backend_option, resolve_backend, swap_linears
from fxcompress.quant.sibling_fusion import fuse_sibling_linears
from fxcompress.quant.token_zero_point import SYMMETRIC, token_zero_points

__all__ = ["QuantizeDynamic"]

_OPS = ("linear",)


@dataclass(frozen=True)
class QuantizeDynamic(Pass):
    """Makes every in-scope linear layer dynamically quantized: int8 symmetric per-channel
    weights stored as plain int8 tensors, activations quantized on each call, float in and
    float out, so it needs no calibration data and runs on a float graph.

    ``ops=("linear",)`` covers ``nn.Linear`` modules and the projections inside
    ``nn.MultiheadAttention`` (which symbolic tracing keeps whole: the module becomes a
    :class:`~fxcompress.quant.lowered_attention.QuantMultiheadAttention`, attention
    itself staying float). There is no dynamic int8 conv kernel: use ``lower`` for
    convs. ``granularity``: ``per_token`` (the default: uint8 codes with a scale per row, oneDNN
    qlinear; robust to rows of very different ranges, the more accurate on every model of
    ``benchmarks/dynamic.py`` and ``benchmarks/minilm.py`` at the same speed) or ``per_tensor``
    (asymmetric uint8 for the whole input, oneDNN qlinear). ``token_zero_point`` (per token): the zero
    point every row of a layer shares, ``"auto"`` (the default: per layer, the one with the
    least rounding noise on its input rows, recorded on the run's calibration data or else its
    example inputs; see :mod:`fxcompress.quant.token_zero_point`) or an int in 1..254 for every
    layer (128: about symmetric). Projections inside ``nn.MultiheadAttention`` use 128.
    ``fuse_siblings`` (default True): dynamic linears that read the same value under one parent
    (an attention's query, key and value) become one layer, named by its members
    (``query_key_value``), whose input is quantized once for one GEMM; exact, the outputs are
    bit for bit the separate layers' (:mod:`fxcompress.quant.sibling_fusion`). ``backend`` (default: the run's) ``x86`` or ``reference``.
    ``bits``: 8, or 7 (weights in [-63, 63], as ``fxcompress.quant.spec.portable_weight_spec``:
    they run on oneDNN's int8 kernels on every CPU, including AVX2 ones, where 8-bit weights
    could overflow its 16-bit pair sums and take the reference path; linears only).
    Stats: ``linear`` and ``attention`` (modules replaced), ``float_nodes`` (node -> why it
    stayed float: functional linears, unsupported attention options, subclasses, modules kept
    whole with linears inside), ``fallbacks`` (nodes on the reference path, with the kernel's
    reason), ``fused`` (fused path -> its members' paths) and, with ``token_zero_point="auto"``,
    ``token_zero_points`` (node -> the zero point chosen).
    """

    name = "quantize_dynamic"

    bits: int = 8
    ops: tuple[str, ...] = ("linear",)
    granularity: str = DEFAULT_GRANULARITY
    token_zero_point: int | str = "auto"
    fuse_siblings: bool = True
    backend: str | None = None

    def __post_init__(self) -> None:
        if self.bits not in (8, 7):
            raise ConfigError(f"bits={self.bits!r} is not supported: the dynamic kernels are int8 only "
                              f"(bits=8, or 7 for weights every CPU's kernels take); for 4/2-bit weights "
                              f"use quantize_weights")
        unknown = [op for op in self.ops if op not in _OPS]
        if unknown or not self.ops:
            raise ConfigError(f"ops {list(self.ops)} invalid; supported: {list(_OPS)} "
                              f"(there is no dynamic int8 conv kernel: lower convs with 'lower')")
        check_backend_option(self.backend)
        check_choice("granularity", self.granularity, GRANULARITIES)
        z = self.token_zero_point
        if z != "auto" and (isinstance(z, bool) or not isinstance(z, int) or not 1 <= z <= 254):
            raise ConfigError(f"token_zero_point must be 'auto' or an int in 1..254, got {z!r}")

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        backend = resolve_backend(self.backend, ctx)

        qmax = (1 << (self.bits - 1)) - 1
        zero_points, source = self._zero_points(gm, ctx)

        def linear(m: nn.Linear) -> DynamicQuantLinear:
            scale = m.weight.detach().float().abs().amax(dim=1).clamp_min(1e-12) / qmax
            return DynamicQuantLinear.from_float(m, scale, granularity=self.granularity,
                                                 token_zero_point=zero_points.get(id(m), SYMMETRIC), backend=backend)

        def attention(m: nn.MultiheadAttention) -> QuantMultiheadAttention | str:
            if self.bits != 8:
                return f"bits={self.bits} covers nn.Linear only; this attention stays float"
            return QuantMultiheadAttention.from_float(m, "dynamic", granularity=self.granularity,
                                                      backend=backend)

        swapped = swap_linears(gm, ctx, linear, attention)
        swapped.float_nodes.update(float_leaves(gm, ctx, set(swapped.replaced) | set(swapped.float_nodes)))
        fallbacks = [{"node": name, "reason": support.reason}
                     for name, m in swapped.replaced.items() if not (support := _support(m))]
        stats: dict[str, Any] = {**swapped.stats(), "fallbacks": fallbacks}
        stats["fused"] = fuse_sibling_linears(gm) if self.fuse_siblings else {}
        if stats["fused"]:
            propagate_shapes(gm, *ctx.example_inputs())  # annotates the split nodes
        notes = [f"{swapped.linear} linear and {swapped.attention} attention modules now dynamic int8 "
                 f"({self.bits}-bit weights, {self.granularity}, backend {backend})"]
        if swapped.float_nodes:
            notes.append(f"{len(swapped.float_nodes)} linear nodes kept float (see float_nodes)")
        if fallbacks:
            notes.append(f"{len(fallbacks)} nodes run the reference path: {fallbacks[0]['reason']}")
        if stats["fused"]:
            notes.append(f"{sum(map(len, stats['fused'].values()))} sibling linears fused into "
                         f"{len(stats['fused'])} (one quantized input, one GEMM each)")
        if source:
            picked = sorted(zero_points.values())
            notes.append(f"per-token zero points from {source}: {picked[0]}..{picked[-1]}" if picked
                         else f"per-token zero points: no linear to choose for in {source}")
            stats["token_zero_points"] = {name: m.token_zero_point for name, m in swapped.replaced.items()
                                          if isinstance(m, DynamicQuantLinear)}
        stats["notes"] = notes
        return PassResult(gm, swapped.linear + swapped.attention > 0, stats)

    def _zero_points(self, gm: fx.GraphModule, ctx: PassContext) -> tuple[dict[int, int], str]:
        """``id(linear) -> zero point`` for the in-scope plain linears, and the data's name
        (empty when none was measured: per tensor, or a fixed zero point)."""
        if self.granularity != "per_token":
            return {}, ""
        linears = {str(n.target): gm.get_submodule(str(n.target)) for n in gm.graph.nodes
                   if n.op == "call_module" and ctx.in_scope(n) and describe(n, gm).kind is Kind.LINEAR}
        if self.token_zero_point != "auto":
            return {id(m): int(self.token_zero_point) for m in linears.values()}, ""
        chosen, source = token_zero_points(gm, ctx, linears)
        return {id(linears[path]): z for path, z in chosen.items()}, source


def _support(m: LoweredModule) -> Any:
    return (m.in_proj if isinstance(m, QuantMultiheadAttention) else m).kernel_support()
