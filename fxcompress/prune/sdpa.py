"""The channel rule of ``F.scaled_dot_product_attention``: whole heads of decomposed attention are units.

Graphs captured by the torch.export front end (Hugging Face BERT, DistilBERT,
GPT-2, ViT, and ``nn.MultiheadAttention`` inside ``nn.TransformerEncoder``)
hold attention decomposed: q/k/v ``nn.Linear`` (or one fused projection
``split`` in three, GPT-2's ``c_attn``) -> ``view``/``reshape`` to
``(B, S, H, D)`` -> ``transpose``/``permute`` -> ``scaled_dot_product_attention``
-> ``transpose`` -> ``reshape`` to ``(B, S, H * D)`` -> output ``nn.Linear``.

Design: a rule for the op itself, not a raising of the pattern into an
attention module.  The label tensors of :mod:`~fxcompress.prune.labels`
already carry a projection's output channels through the head split and the
transposes (a view to ``(B, S, -1, D)`` lays them on a heads dim and a
``head_dim`` dim) and back through the merge reshape into the output
projection's columns, whatever the layout (separate q/k/v, a fused projection
split in pieces, batch and heads merged), so what is left unknown is only the
op in the middle.  Raising the pattern into a module the
:class:`~fxcompress.prune.heads.AttentionRule` knows would have to recognise
every model's spelling of it (and give up on any variant), and would hide the
q/k/v Linears from the other passes; the rule needs none of that.

For head *h*, the rule joins rows ``h * D .. (h + 1) * D`` of q, k and v (their
atoms at position *h* of the heads dim) and, through v, the same input
columns of the output projection into **one unit**, so heads go whole and
``head_dim`` never changes (q·k contracts over it; the scale ``1/sqrt(D)``
stays right).  The projections making those atoms are marked as head sources
(:meth:`~fxcompress.prune.state.AnalysisState.mark_heads`), so selection
treats the group as a layer's heads (``head_ratio``, per layer).  Slicing
needs nothing new: the sliced shapes give every ``view``/``reshape`` literal
its new value (an ``H`` written out; a ``-1`` or a run-time size, as for
batch and sequence, is left as it is) and ``split`` its new piece sizes.
The importance of a head is, as for ``nn.MultiheadAttention``, the criterion
summed over its q, k, v rows and output-projection columns.

Heads are frozen, with the reason, when:

* q, k and v do not each hold channels on exactly the heads and ``head_dim``
  dims (a ``head_dim`` not split from a projection, shapes not recognised);
* their head counts differ (grouped-query attention, ``enable_gqa``);
* ``attn_mask`` holds one mask per head (its heads dim is not 1), or is
  itself computed from channels;
* the layers are outside the pass's scope (the linear rules freeze them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..ops import OpInfo, meta_shape
from .types import RuleState, Space

__all__ = ["SdpaRule"]

_State = RuleState if TYPE_CHECKING else object


class SdpaRule(_State):
    """The rule for ``scaled_dot_product_attention`` (a mixin of the analyzer)."""

    def scaled_dot_product_attention(self, info: OpInfo) -> None:
        node = info.node
        where = f"scaled_dot_product_attention at node {node.name}"
        if len(info.inputs) < 3:
            self.unknown(info, f"{where}: query, key and value not found")
            return
        mask = info.params.get("attn_mask")
        self.freeze_all(mask, f"{where}: channels used as attn_mask")
        q, k, v = (self.space(t) for t in info.inputs[:3])
        shapes = [meta_shape(t.meta.get("tensor_meta")) if hasattr(t, "meta") else None for t in info.inputs[:3]]
        why = _not_heads(q, k, v, shapes)
        if why is None and node.kwargs.get("enable_gqa"):
            why = "grouped-query attention (enable_gqa): k/v heads are shared by several query heads"
        if why is None:
            why = _mask_per_head(mask, shapes[0])
        if why is not None:
            if all(s.empty for s in (q, k, v)):  # nothing prunable arrives: nothing to freeze
                self.spaces[node] = self.empty_like(node.meta.get("tensor_meta"))
                return
            self.unknown(info, f"{where}: {why}")
            return
        n_heads = q.ids.shape[0]
        # one unit per head: its q, k and v positions (all of head_dim) together
        per_head = torch.cat([s.ids.reshape(n_heads, -1) for s in (q, k, v)], dim=1)
        self.union(per_head[:, :1].expand_as(per_head), per_head)
        self.mark_heads(per_head)
        self.spaces[node] = Space(v.dims, v.ids)  # the output holds v's heads, head-major as v


def _not_heads(q: Space, k: Space, v: Space, shapes: list) -> str | None:
    """Why q, k, v are not (heads, head_dim) channel spaces of one head count, or None."""
    for name, s, shape in zip(("query", "key", "value"), (q, k, v), shapes):
        if shape is None or len(shape) < 3:
            return f"{name} is not a tensor of rank >= 3"
        n = len(shape)
        if s.empty:
            return f"{name} holds no prunable channels (not made by a projection the analysis follows)"
        if s.dims != (n - 3, n - 1):
            return (f"{name} holds channels on dims {s.dims}, not on the heads and head_dim dims "
                    f"({n - 3}, {n - 1}): the head layout is not recognised")
    if not (q.ids.shape[0] == k.ids.shape[0] == v.ids.shape[0]):
        return "query, key and value have different head counts (grouped-query attention)"
    return None


def _mask_per_head(mask, q_shape) -> str | None:
    """Why ``attn_mask`` ties the heads (one mask per head), or None."""
    shape = meta_shape(mask.meta.get("tensor_meta")) if hasattr(mask, "meta") else None
    if shape is None or q_shape is None:
        return None
    heads_dim = len(shape) - 3  # the mask broadcasts against (..., H, L, S) from the right
    if heads_dim >= 0 and shape[heads_dim] != 1 and q_shape[len(q_shape) - 3] > 1:
        return "attn_mask holds one mask per head"
    return None
