"""``nn.MultiheadAttention`` with quantized projections: what dynamic and weight-only passes put in.

Symbolic tracing keeps ``nn.MultiheadAttention`` whole (one ``call_module`` node), and it
calls its projections functionally, so a pass that only swaps ``nn.Linear`` modules never
reaches them: in a ViT they hold a third of the weights. :class:`QuantMultiheadAttention`
replaces the whole module: its input projection (q, k and v stacked, ``3E x E``) and its
output projection are lowered linears (:class:`DynamicQuantLinear` or
:class:`WeightOnlyLinear`); the attention itself runs in the activations' float dtype
through ``F.scaled_dot_product_attention`` (or written out when the weights are asked for).

It takes ``nn.MultiheadAttention``'s call signature and returns what it returns,
``(output, weights or None)``, for batched and unbatched inputs, ``batch_first`` either
way, boolean or float ``attn_mask`` / ``key_padding_mask``. Inference only (no dropout).
Not supported (``from_float`` raises :class:`LoweringError`, the passes keep such a module
float and say why): ``kdim``/``vdim`` different from ``embed_dim``, ``add_bias_kv``,
``add_zero_attn``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fxcompress import macs
from fxcompress.attention_mask import additive_mask
from fxcompress.errors import ConfigError, InputError, LoweringError
from fxcompress.quant.lowered_base import LoweredModule
from fxcompress.quant.lowered_linear import DynamicQuantLinear, WeightOnlyLinear

__all__ = ["PROJECTIONS", "QuantMultiheadAttention", "attention_support"]

#: Projection kinds: the lowered linear class each one uses.
PROJECTIONS: dict[str, type[LoweredModule]] = {"dynamic": DynamicQuantLinear, "weight_only": WeightOnlyLinear}


def attention_support(mha: nn.MultiheadAttention) -> str | None:
    """Why ``mha`` cannot become a :class:`QuantMultiheadAttention`, or None when it can."""
    if not mha._qkv_same_embed_dim:
        return f"kdim/vdim ({mha.kdim}/{mha.vdim}) differ from embed_dim {mha.embed_dim}"
    if mha.bias_k is not None:
        return "add_bias_kv=True is not supported"
    if mha.add_zero_attn:
        return "add_zero_attn=True is not supported"
    return None


class QuantMultiheadAttention(LoweredModule):
    """Multi-head attention whose q/k/v and output projections are lowered linears.

    ``projection`` is ``"dynamic"`` (int8 weights, activations quantized per call) or
    ``"weight_only"`` (8/4/2-bit packed weights); ``projection_options`` are the keyword
    options of that linear class (``granularity``; ``bits``, ``group_size``,
    ``compute_dtype``, ``cache_dequantized``). Self-attention (query, key and value the
    same tensor) runs the stacked input projection once; otherwise the projection runs
    once per distinct input and keeps the slice it needs.
    """

    def __init__(self, embed_dim: int, num_heads: int, bias: bool = True, *, batch_first: bool = False,
                 projection: str = "dynamic", projection_options: dict[str, Any] | None = None,
                 backend: str = "x86") -> None:
        super().__init__(backend)
        if projection not in PROJECTIONS:
            raise ConfigError(f"projection must be one of {tuple(PROJECTIONS)}, got {projection!r}")
        if num_heads < 1 or embed_dim % num_heads:
            raise ConfigError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.batch_first = embed_dim, num_heads, bool(batch_first)
        self.head_dim = embed_dim // num_heads
        self.projection = projection
        self.projection_options = dict(projection_options or {})
        linear = PROJECTIONS[projection]
        options = {**self.projection_options, "backend": backend}
        self.in_proj = linear(embed_dim, 3 * embed_dim, bias, **options)
        self.out_proj = linear(embed_dim, embed_dim, bias, **options)

    @classmethod
    def from_float(cls, mha: nn.MultiheadAttention, projection: str = "dynamic", *,
                   backend: str = "x86", **projection_options: Any) -> QuantMultiheadAttention:
        """Quantize ``mha``'s projections with ``PROJECTIONS[projection].from_float``."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise LoweringError(f"QuantMultiheadAttention.from_float needs an nn.MultiheadAttention, "
                                f"got {type(mha).__name__}")
        reason = attention_support(mha)
        if reason is not None:
            raise LoweringError(f"QuantMultiheadAttention cannot take this nn.MultiheadAttention: {reason}")
        bias = mha.in_proj_bias is not None
        m = cls(mha.embed_dim, mha.num_heads, bias, batch_first=mha.batch_first, projection=projection,
                projection_options=projection_options, backend=backend)
        in_proj = nn.Linear(mha.embed_dim, 3 * mha.embed_dim, bias=bias)
        with torch.no_grad():
            in_proj.weight.copy_(mha.in_proj_weight)
            if bias:
                in_proj.bias.copy_(mha.in_proj_bias)
        linear = PROJECTIONS[projection]
        m.in_proj = linear.from_float(in_proj, **projection_options, backend=backend)
        m.out_proj = linear.from_float(mha.out_proj, **projection_options, backend=backend)
        return m

    def config(self) -> dict[str, Any]:
        return {"embed_dim": self.embed_dim, "num_heads": self.num_heads,
                "bias": self.in_proj.bias is not None, "batch_first": self.batch_first,
                "projection": self.projection, "projection_options": dict(self.projection_options),
                "backend": self.backend}

    def reset_cache(self) -> None:
        """Forget the projections' kernel caches too."""
        super().reset_cache()
        self.in_proj.reset_cache()
        self.out_proj.reset_cache()

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``nn.MultiheadAttention.forward``'s contract (eval mode)."""
        if query.dim() not in (2, 3) or query.shape[-1] != self.embed_dim:
            raise InputError(f"QuantMultiheadAttention expects (L, {self.embed_dim}) or a batched 3-D "
                             f"query, got {tuple(query.shape)}")
        if is_causal and attn_mask is None:
            raise InputError("is_causal=True needs attn_mask (as in nn.MultiheadAttention): it is only a hint")
        unbatched = query.dim() == 2
        same_kv, self_attention = key is value, key is value and query is key
        if unbatched:  # one sequence: a batch of one, batch first
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        q, k, v = self._project(query, key, value, self_attention, same_kv)
        b, tgt, src = q.shape[0], q.shape[1], k.shape[1]
        q, k, v = (t.reshape(b, -1, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        mask = additive_mask(attn_mask, key_padding_mask, batch=b, heads=self.num_heads, tgt=tgt, src=src,
                             dtype=q.dtype, owner="QuantMultiheadAttention")
        weights = None
        if need_weights:
            scores = (q @ k.transpose(-2, -1)).mul_(1.0 / math.sqrt(self.head_dim))
            weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            out = weights @ v
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = self.out_proj(out.transpose(1, 2).reshape(b, tgt, self.embed_dim))
        if unbatched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def _project(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, self_attention: bool,
                 same_kv: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        e = self.embed_dim
        if self_attention:
            q, k, v = self.in_proj(query).split(e, dim=-1)
            return q, k, v
        q = self.in_proj(query)[..., :e]
        if same_kv:
            k, v = self.in_proj(key)[..., e:].split(e, dim=-1)
            return q, k, v
        return q, self.in_proj(key)[..., e:2 * e], self.in_proj(value)[..., 2 * e:]

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}, "
                f"projection={self.projection}, attention=float, backend={self.backend}")


def _count_macs(gm: torch.fx.GraphModule, node: torch.fx.Node) -> dict[str, int]:
    """Projections (q from the query; k, v from key/value; out) plus scores and weighted sum."""
    module = gm.get_submodule(str(node.target))
    query, key = (n.meta["tensor_meta"].shape for n in node.args[:2])
    embed = module.embed_dim
    tokens_q, tokens_k = math.prod(query[:-1]), math.prod(key[:-1])
    seq_k = key[-2] if module.batch_first and len(key) == 3 else key[0]
    batch = tokens_k // seq_k
    projections = 2 * tokens_q * embed * embed + 2 * tokens_k * embed * embed
    return {"linear": projections, "attention": 2 * batch * (tokens_q // batch) * seq_k * embed}


macs.register_module(QuantMultiheadAttention, _count_macs)
