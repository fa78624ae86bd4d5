"""Multi-head attention whose heads and widths are independent: what head pruning puts in.

``nn.MultiheadAttention`` ties its widths together: the query's width
(``embed_dim``) is also the width of every projection and of the output, and
``head_dim = embed_dim // num_heads``.  Removing whole heads shrinks the
projections' inner width (``num_heads * head_dim``) while the residual stream
keeps its own width, and pruning the stream shrinks ``embed_dim`` while the
heads keep theirs: neither fits the packed module.  :class:`PrunedMultiheadAttention`
has four explicit ``nn.Linear`` projections (q, k, v, out) whose inner width
is ``num_heads * head_dim`` whatever the input and output widths are, and the
call signature and results of ``nn.MultiheadAttention``.  ``prune_channels``
puts it in place of an attention layer whose heads or widths it changes.

:func:`layout` tells the channel analysis where the heads and widths of
either module live in its parameters; :func:`rebuild` makes the replacement
from a module whose parameters have been sliced.  Importing this module
teaches :mod:`fxcompress.ops` (``Kind.ATTENTION``), :mod:`fxcompress.macs`
and the artifact format (:func:`fxcompress.artifact.register_module`) the new class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .. import macs, ops
from ..artifact import register_module
from ..attention_mask import additive_mask
from ..errors import InputError

__all__ = ["PrunedMultiheadAttention", "AttentionLayout", "call_arguments", "layout", "unsupported", "rebuild"]

_PROJECTIONS = ("q_proj", "k_proj", "v_proj")
# nn.MultiheadAttention.forward's arguments, in order, with their defaults (the class below takes the same).
_ARGUMENTS = {"query": None, "key": None, "value": None, "key_padding_mask": None, "need_weights": True,
              "attn_mask": None, "average_attn_weights": True, "is_causal": False}


@register_module
class PrunedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with explicit projections and free widths.

    ``embed_dim``/``kdim``/``vdim`` are the widths of query/key/value,
    ``out_dim`` that of the output (default ``embed_dim``); the projections map
    them to ``num_heads * head_dim``.  ``forward`` takes and returns what
    ``nn.MultiheadAttention.forward`` does: ``(output, weights or None)``,
    batched or unbatched, ``batch_first`` either way, bool or float
    ``attn_mask`` ((L, S) or (N * num_heads, L, S)) and ``key_padding_mask``,
    weights averaged over heads or not, dropout on the weights in training.
    Scores are scaled by ``1 / sqrt(head_dim)``, as there.
    """

    fxc_leaf = True  # capture keeps it whole, like the nn.MultiheadAttention it replaces

    _fxc_name = "fxcompress.prune.attention.PrunedMultiheadAttention"

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, *, kdim: int | None = None,
                 vdim: int | None = None, out_dim: int | None = None, bias: bool = True, dropout: float = 0.0,
                 batch_first: bool = False) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.out_dim = out_dim or embed_dim
        self.dropout, self.batch_first = float(dropout), bool(batch_first)
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(embed_dim, inner, bias)
        self.k_proj = nn.Linear(self.kdim, inner, bias)
        self.v_proj = nn.Linear(self.vdim, inner, bias)
        self.out_proj = nn.Linear(inner, self.out_dim, bias)

    @classmethod
    def from_module(cls, mha: nn.MultiheadAttention) -> PrunedMultiheadAttention:
        """The same attention as ``mha`` (weights copied), in this class's form."""
        return rebuild(mha, dict(mha.named_children()))

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if query.dim() not in (2, 3) or query.shape[-1] != self.embed_dim:
            raise InputError(f"PrunedMultiheadAttention expects a query of width {self.embed_dim}, (L, E) or "
                             f"3-D, got {tuple(query.shape)}")
        if is_causal and attn_mask is None:  # nn.MultiheadAttention's rule: the flag is only a hint
            raise InputError("PrunedMultiheadAttention: is_causal=True needs attn_mask")
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, tgt, src = query.shape[0], query.shape[1], key.shape[1]
        q = self.q_proj(query).view(n, tgt, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(key).view(n, src, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(value).view(n, src, self.num_heads, self.head_dim).transpose(1, 2)
        mask = additive_mask(attn_mask, key_padding_mask, batch=n, heads=self.num_heads, tgt=tgt, src=src,
                             dtype=q.dtype, owner="PrunedMultiheadAttention")
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
            weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            out = F.dropout(weights, p) @ v
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = self.out_proj(out.transpose(1, 2).reshape(n, tgt, self.num_heads * self.head_dim))
        if unbatched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def extra_repr(self) -> str:
        widths = f"embed_dim={self.embed_dim}, kdim={self.kdim}, vdim={self.vdim}, out_dim={self.out_dim}"
        return f"{widths}, num_heads={self.num_heads}, head_dim={self.head_dim}, batch_first={self.batch_first}"

    # -- the artifact protocol (fxcompress.artifact.register_module) -------------------------------------
    def _fxc_config(self) -> dict[str, Any]:
        return {"embed_dim": self.embed_dim, "num_heads": self.num_heads, "head_dim": self.head_dim,
                "kdim": self.kdim, "vdim": self.vdim, "out_dim": self.out_dim,
                "bias": self.q_proj.bias is not None, "dropout": self.dropout, "batch_first": self.batch_first}

    @classmethod
    def _fxc_from_config(cls, config: dict[str, Any], state: dict[str, torch.Tensor]) -> PrunedMultiheadAttention:
        with torch.device("meta"):  # nothing initialised: the stored tensors replace these
            module = cls(**config)
        module.load_state_dict(state, assign=True)
        return module


# -- what the channel analysis needs -------------------------------------------------------------------
@dataclass(frozen=True)
class AttentionLayout:
    """Where an attention module keeps its heads and widths (paths relative to the module).

    ``rows``: (owner, attr, part) for every tensor indexed along dim 0 by the
    inner width of part "q", "k", "v" or "qkv" (the three stacked, as in
    ``in_proj_weight``); ``columns``: (owner, attr, input) for every weight
    read along dim 1 by the channels of input "query", "key" or "value";
    ``out``: the output projection's owner (weight dim 1 = the inner width of
    "v", dim 0 and bias = the output's channels).  Inner widths are head-major:
    position ``h * head_dim + d``.
    """

    num_heads: int
    head_dim: int
    rows: tuple[tuple[str, str, str], ...]
    columns: tuple[tuple[str, str, str], ...]
    out: str


def call_arguments(node: fx.Node) -> dict[str, Any]:
    """The arguments of an attention module call by name, defaults filled in."""
    bound = dict(_ARGUMENTS)
    bound.update(zip(_ARGUMENTS, node.args))
    bound.update(node.kwargs)
    return bound


def unsupported(module: nn.Module) -> str | None:
    """Why the heads and widths of ``module`` cannot be pruned, or None."""
    if ops.describe_module(module).op != "multihead_attention":  # plain nn.MultiheadAttention, or ours
        return f"{type(module).__name__} is not a multi-head attention module fxcompress can prune"
    if isinstance(module, PrunedMultiheadAttention):
        return None
    if module.bias_k is not None or module.add_zero_attn:
        return "add_bias_kv / add_zero_attn are not supported by the pruned attention"
    return None


def layout(module: nn.Module) -> AttentionLayout:
    """The :class:`AttentionLayout` of an ``nn.MultiheadAttention`` or a :class:`PrunedMultiheadAttention`."""
    if isinstance(module, PrunedMultiheadAttention):
        rows = tuple((name, attr, name[0]) for name in _PROJECTIONS for attr in ("weight", "bias")
                     if getattr(getattr(module, name), attr) is not None)
        columns = tuple((name, "weight", kind) for name, kind in zip(_PROJECTIONS, ("query", "key", "value")))
        return AttentionLayout(module.num_heads, module.head_dim, rows, columns, "out_proj")
    bias = (("", "in_proj_bias", "qkv"),) if module.in_proj_bias is not None else ()
    if module._qkv_same_embed_dim:
        rows = (("", "in_proj_weight", "qkv"),) + bias
        columns = tuple(("", "in_proj_weight", kind) for kind in ("query", "key", "value"))
    else:
        names = ("q_proj_weight", "k_proj_weight", "v_proj_weight")
        rows = tuple(("", name, name[0]) for name in names) + bias
        columns = tuple(("", name, kind) for name, kind in zip(names, ("query", "key", "value")))
    return AttentionLayout(module.num_heads, module.head_dim, rows, columns, "out_proj")


def rebuild(module: nn.Module, children: dict[str, nn.Module]) -> PrunedMultiheadAttention:
    """A :class:`PrunedMultiheadAttention` with ``module``'s (possibly sliced) tensors.

    ``module`` is an ``nn.MultiheadAttention`` or a :class:`PrunedMultiheadAttention`
    whose tensors may have been sliced (rows: whole heads; columns: input
    channels) without its size attributes following; ``children`` are its
    submodules as they should be (sliced copies).  Widths are read off the
    tensors; ``head_dim`` is kept.
    """
    if isinstance(module, PrunedMultiheadAttention):
        weights = [children[name].weight for name in _PROJECTIONS]
        biases = [children[name].bias for name in _PROJECTIONS]
    elif module._qkv_same_embed_dim:
        weights = list(module.in_proj_weight.chunk(3))
        biases = list(module.in_proj_bias.chunk(3)) if module.in_proj_bias is not None else [None] * 3
    else:
        weights = [module.q_proj_weight, module.k_proj_weight, module.v_proj_weight]
        biases = list(module.in_proj_bias.chunk(3)) if module.in_proj_bias is not None else [None] * 3
    out = children["out_proj"]
    embed_dim, kdim, vdim = (int(w.shape[1]) for w in weights)
    with torch.device("meta"):  # the projections are replaced below: initialising them would be wasted
        new = PrunedMultiheadAttention(embed_dim, int(weights[0].shape[0]) // module.head_dim, module.head_dim,
                                       kdim=kdim, vdim=vdim, out_dim=int(out.weight.shape[0]),
                                       bias=biases[0] is not None, dropout=module.dropout,
                                       batch_first=module.batch_first)
    for name, weight, bias in zip(_PROJECTIONS, weights, biases):
        setattr(new, name, _linear(weight, bias))
    new.out_proj = _linear(out.weight, out.bias)
    new.train(module.training)
    return new


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` holding copies of ``weight``/``bias`` (no initialisation spent on it)."""
    with torch.device("meta"):
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias is not None)
    linear.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
    return linear


# -- what the other layers need to know about the new class -------------------------------------------------
def _describe(module: PrunedMultiheadAttention) -> tuple[ops.Kind, str, dict[str, Any]]:
    return ops.Kind.ATTENTION, "multihead_attention", {
        "num_heads": module.num_heads, "embed_dim": module.embed_dim, "head_dim": module.head_dim,
        "batch_first": module.batch_first, "channel_dim": -1}


def _count_macs(gm: fx.GraphModule, node: fx.Node) -> dict[str, int]:
    """Projections as linears; scores and weighted sum as attention (``macs``' conventions)."""
    module: PrunedMultiheadAttention = gm.get_submodule(str(node.target))
    bound = call_arguments(node)
    query, key = ops.tensor_shape(bound["query"]), ops.tensor_shape(bound["key"])
    tokens_q, tokens_k = math.prod(query[:-1]), math.prod(key[:-1])
    seq_k = key[-2] if module.batch_first and len(key) == 3 else key[0]
    inner = module.num_heads * module.head_dim
    projections = (tokens_q * inner * (module.embed_dim + module.out_dim)
                   + tokens_k * inner * (module.kdim + module.vdim))
    return {"linear": projections, "attention": 2 * tokens_q * seq_k * inner}


ops.register_module(PrunedMultiheadAttention, _describe)
macs.register_module(PrunedMultiheadAttention, _count_macs)
