"""The channel rule of multi-head attention modules: whole heads are units.

An attention module (``nn.MultiheadAttention``, or the
:class:`~fxcompress.prune.attention.PrunedMultiheadAttention` that replaces it
once pruned) makes two kinds of channels:

* its **heads**: for head *h*, rows ``h * head_dim .. (h + 1) * head_dim`` of
  the q, k and v projections and the same columns of the output projection.
  They are joined into one unit per head (``head_dim`` never changes: q·k
  contracts over it and every head must keep the same width), and form a
  group of their own, the ``part="heads"`` source of the node;
* its **outputs**: the output projection's rows, new atoms like a linear's.

The query, key and value channels are *consumed* by the projections' columns,
so the residual stream around the attention (ViT's embedding) prunes like
any linear layer's inputs.  Heads are frozen, with the reason, when the
attention weights per head are used (``need_weights`` with their values
consumed: they average over or list the heads), when a 3-D ``attn_mask``
holds one mask per head, or when the layer is outside the pass's scope.  The
packed ``in_proj_weight`` reads query, key and value with the same columns,
so their channels are joined there, and frozen where one of them has fixed
channels.  Slicing replaces the module (:func:`fxcompress.prune.attention.rebuild`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import fx

from ..ops import Kind, OpInfo, describe, meta_shape
from .attention import call_arguments, layout, unsupported
from .types import EMPTY, RuleState, Space

__all__ = ["AttentionRule"]

_INPUTS = ("query", "key", "value")


def _path(module: str, owner: str) -> str:
    return f"{module}.{owner}" if owner else module


# The analyzer's state, declared for type checkers only (at run time the Analyzer has it).
_State = RuleState if TYPE_CHECKING else object


class AttentionRule(_State):
    """The rule for ``Kind.ATTENTION`` (a mixin of the :class:`~fxcompress.prune.rules.Analyzer`)."""

    def attention(self, info: OpInfo) -> None:
        """``Kind.ATTENTION``: an ``nn.MultiheadAttention`` or a ``scaled_dot_product_attention``
        (:mod:`~fxcompress.prune.sdpa`) prunes by heads; any other freezes."""
        if info.op == "multihead_attention" and info.module is not None:
            self.multihead_attention(info)
            return
        if info.op == "scaled_dot_product_attention":  # decomposed attention (export): fxcompress.prune.sdpa
            self.scaled_dot_product_attention(info)
            return
        why = {"shifted_window_attention": "derives head_dim from its input width"}.get(
            info.op, "mixes channels across heads")
        self.unknown(info, f"{info.op} at node {info.node.name}: {why}")

    def multihead_attention(self, info: OpInfo) -> None:
        node, module, path = info.node, info.module, str(info.node.target)
        meta = node.meta["tensor_meta"]
        out_shape = meta_shape(meta[0] if isinstance(meta, (tuple, list)) else meta)
        why = unsupported(module)
        if why is not None or out_shape is None:
            self.unknown(info, f"multihead_attention at node {node.name}: {why or 'output is not a tensor'}")
            if out_shape is not None:  # its outputs are channels of their own, kept
                self._attention_output(node, self.fresh(out_shape[-1], node, f"multihead_attention at node "
                                                                             f"{node.name}: {why}"), out_shape)
            return
        args = call_arguments(node)
        for name in ("key_padding_mask", "attn_mask"):
            self.freeze_all(args[name], f"multihead_attention at node {node.name}: channels used as {name}")
        spaces = self._attention_inputs(info, args)
        lay = layout(module)
        heads = self.fresh(3 * lay.num_heads * lay.head_dim, node, part="heads").reshape(3, lay.num_heads, -1)
        per_head = heads.transpose(0, 1).reshape(lay.num_heads, -1)
        self.union(per_head[:, :1].expand_as(per_head), per_head)
        parts = {"q": heads[0], "k": heads[1], "v": heads[2], "qkv": heads}
        for owner, attr, part in lay.rows:
            self.record(_path(path, owner), attr, 0, parts[part], "out", node)
        out_owner = _path(path, lay.out)
        self.record(out_owner, "weight", 1, heads[2], "in", node)
        for owner, attr, name in lay.columns:
            if not spaces[name].empty:
                self.record(_path(path, owner), attr, 1, spaces[name].ids, "in", node)
        out = self.fresh(out_shape[-1], node)
        self.record(out_owner, "weight", 0, out, "out", node)
        if module.get_submodule(lay.out).bias is not None:
            self.record(out_owner, "bias", 0, out, "out", node)
        self._attention_output(node, out, out_shape)
        reason = self._heads_fixed(node, args)
        if reason is not None:
            self.freeze(heads, f"multihead_attention at node {node.name}: {reason}")
        if not self.in_scope(node):
            for ids in (heads, out, *(s.ids for s in spaces.values() if not s.empty)):
                self.freeze(ids, self.out_of_scope(node))

    def _attention_inputs(self, info: OpInfo, args: dict) -> dict[str, Space]:
        """The channels of query, key and value that the projections' columns may lose."""
        spaces = {}
        for name in _INPUTS:
            value = args[name]
            space = self.space(value)
            if not space.empty:
                reason = self.check_dims(space, {len(meta_shape(value.meta["tensor_meta"])) - 1}, info)
                if reason:
                    self.freeze(space, reason)
                    space = EMPTY
            spaces[name] = space
        readers: dict[tuple[str, str], list[str]] = {}
        for owner, attr, name in layout(info.module).columns:
            readers.setdefault((owner, attr), []).append(name)
        for names in readers.values():  # one weight read by several inputs: all or none may shrink
            if len(names) > 1 and any(spaces[n].empty for n in names):
                for n in names:
                    self.freeze(spaces[n], f"multihead_attention at node {info.node.name}: its packed "
                                           f"projection reads {', '.join(names)} with the same columns, and "
                                           f"some of them have fixed channels")
                    spaces[n] = EMPTY
        return spaces

    def _attention_output(self, node: fx.Node, out: torch.Tensor, shape: tuple[int, ...]) -> None:
        meta = node.meta["tensor_meta"]
        space = Space((len(shape) - 1,), out)
        self.spaces[node] = (space, *self.empty_like(meta)[1:]) if isinstance(meta, (tuple, list)) else space

    def _heads_fixed(self, node: fx.Node, args: dict) -> str | None:
        """Why the number of heads must stay, or None."""
        mask = args["attn_mask"]
        if isinstance(mask, fx.Node) and len(meta_shape(mask.meta.get("tensor_meta")) or ()) == 3:
            return "attn_mask holds one mask per head"
        if not args["need_weights"]:
            return None
        for user in node.users:
            use = describe(user, self.gm)
            index = use.params.get("index") if use.kind is Kind.GETITEM else None
            if index == 0 or (index == 1 and not user.users):  # the output, or weights nobody reads
                continue
            return "its attention weights are used, and they depend on every head"
        return None
