"""``quantize_weights``: weight-only 8/4/2-bit linears, packed storage; first of all a size win."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import fx, nn

from fxcompress.errors import ConfigError
from fxcompress.ops import tensor_shape
from fxcompress.pass_base import Pass, PassContext, PassResult, check_choice
from fxcompress.quant.kept_whole import float_leaves
from fxcompress.quant.lowered_attention import QuantMultiheadAttention
from fxcompress.quant.lowered_linear import WeightOnlyLinear
from fxcompress.quant.lowered_embedding import WeightOnlyEmbedding
from fxcompress.quant.lowering import Built, check_backend_option, resolve_backend, swap_linears
from fxcompress.quant.lowering.swap import SwapResult, swap_embeddings
from fxcompress.report import state_bytes

__all__ = ["QuantizeWeights"]

_BITS = (8, 4, 2)
_COMPUTE_DTYPES = ("bfloat16", "float32")


@dataclass(frozen=True)
class QuantizeWeights(Pass):
    """Stores every in-scope linear weight in ``bits`` (8, 4 or 2) with one scale per
    ``group_size`` input columns (``None``: one per row), 4- and 2-bit values packed two or
    four to a byte, activations staying float: the state shrinks about ``32 / bits``-fold.

    Covers ``nn.Linear`` modules and the projections inside ``nn.MultiheadAttention``
    (replaced by a :class:`~fxcompress.quant.lowered_attention.QuantMultiheadAttention`), and,
    with ``embeddings=True``, ``nn.Embedding`` tables (replaced by a
    :class:`~fxcompress.quant.lowered_embedding.WeightOnlyEmbedding`: the rows a lookup gathers
    are dequantized; ``group_size`` applies along the embedding dimension). Run after
    ``quantize_dynamic``, it reaches what that pass left float: the embeddings.
    At run time each layer uses the int4/int8 weight-only kernel where its preconditions
    hold and it is faster (``compute_dtype="bfloat16"``, few rows; checked before the
    call, since these kernels crash rather than raise), and otherwise a ``compute_dtype``
    matmul with the weight dequantized once and cached (``cache_dequantized=False`` keeps
    only the packed copy in memory, at a cost per call). A layer whose ``in_features``
    the group size does not divide stays float. Stats: ``linear``, ``attention``,
    ``embedding``, ``float_nodes`` (node -> reason), ``fallbacks`` (layers that never take a kernel at
    their traced shape, with the reason), ``bytes_before``/``bytes_after``.
    """

    name = "quantize_weights"

    bits: int = 4
    group_size: int | None = 128
    compute_dtype: str = "bfloat16"
    cache_dequantized: bool = True
    backend: str | None = None
    embeddings: bool = False

    def __post_init__(self) -> None:
        if self.bits not in _BITS:
            raise ConfigError(f"bits={self.bits!r} is not supported; choose one of {_BITS}")
        if self.group_size is not None and self.group_size < 1:
            raise ConfigError(f"group_size must be a positive int or None (one group "
                              f"per row), got {self.group_size!r}")
        check_backend_option(self.backend)
        check_choice("compute_dtype", self.compute_dtype, _COMPUTE_DTYPES)

    def _options(self, backend: str) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size, "compute_dtype": self.compute_dtype,
                "cache_dequantized": self.cache_dequantized, "backend": backend}

    def _group_problem(self, in_features: int) -> str | None:
        group = in_features if self.group_size is None else min(self.group_size, in_features)
        if in_features % group:
            return f"group_size {self.group_size} does not divide in_features {in_features}"
        return None

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        options = self._options(resolve_backend(self.backend, ctx))
        before = state_bytes(gm)

        def linear(m: nn.Linear) -> Built:
            problem = self._group_problem(m.in_features)
            return problem or WeightOnlyLinear.from_float(m, **options)

        def attention(m: nn.MultiheadAttention) -> Built:
            problem = self._group_problem(m.embed_dim)
            return problem or QuantMultiheadAttention.from_float(m, "weight_only", **options)

        swapped = swap_linears(gm, ctx, linear, attention)
        swapped.float_nodes.update(float_leaves(gm, ctx, set(swapped.replaced) | set(swapped.float_nodes)))
        tables = swap_embeddings(gm, ctx, self._embedding(options["backend"])) if self.embeddings else SwapResult()
        swapped.float_nodes.update(tables.float_nodes)
        nodes = {n.name: n for n in gm.graph.nodes}
        fallbacks = []
        for name, module in swapped.replaced.items():
            layer = module.in_proj if isinstance(module, QuantMultiheadAttention) else module
            support = layer.kernel_support(_rows(nodes[name]))
            if not support:
                fallbacks.append({"node": name, "reason": support.reason})
        after = state_bytes(gm)
        stats: dict[str, Any] = {**swapped.stats(), "embedding": tables.linear, "fallbacks": fallbacks,
                                 "bytes_before": before, "bytes_after": after}
        notes = [f"{swapped.linear} linear, {swapped.attention} attention and {tables.linear} embedding modules now "
                 f"{self.bits}-bit weight-only (group {self.group_size}); state {before / 2**20:.1f} -> "
                 f"{after / 2**20:.1f} MiB"]
        if swapped.float_nodes:
            notes.append(f"{len(swapped.float_nodes)} linear nodes kept float (see float_nodes)")
        stats["notes"] = notes
        return PassResult(gm, swapped.linear + swapped.attention + tables.linear > 0, stats)

    def _embedding(self, backend: str) -> Callable[[nn.Embedding], Built]:
        def build(m: nn.Embedding) -> Built:
            if m.max_norm is not None:
                return "max_norm renormalises rows on lookup; a quantized table cannot"
            group = m.embedding_dim if self.group_size is None else min(self.group_size, m.embedding_dim)
            if m.embedding_dim % group:
                return f"group_size {self.group_size} does not divide embedding_dim {m.embedding_dim}"
            return WeightOnlyEmbedding.from_float(m, self.bits, self.group_size, backend=backend)
        return build


def _rows(node: fx.Node) -> int:
    """Rows of the matmul at the traced shape: the product of the input's leading dims."""
    shape = tensor_shape(node.args[0]) if node.args else None
    if not shape:
        return 1
    rows = 1
    for d in shape[:-1]:
        rows *= d
    return rows
