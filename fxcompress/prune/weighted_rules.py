"""The channel rules of ops with weights: conv, linear, embedding, norms, PReLU.

Convs, linears and embeddings make channels (fresh atoms for their outputs) and
consume them (their weights' input columns); norms and PReLU pass channels
through and hold per-channel parameters sliced with them.  A mixin of
:class:`~fxcompress.prune.rules.Analyzer`, written against
:class:`~fxcompress.prune.types.RuleState`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import fx

from ..ops import OpInfo, meta_shape
from .types import EMPTY, RuleState, Space

__all__ = ["WeightedRules"]

_PER_CHANNEL_NORMS = ("batch_norm", "instance_norm")

# The analyzer's state, declared for type checkers only (at run time the Analyzer has it).
_State = RuleState if TYPE_CHECKING else object


class WeightedRules(_State):
    """Rules for ``Kind.CONV``, ``LINEAR``, ``EMBEDDING``, ``NORM`` and ``ACTIVATION``."""

    def conv(self, info: OpInfo) -> None:
        node = info.node
        shape = meta_shape(node.meta["tensor_meta"])
        x = self.space(info.inputs[0])
        weight = self.param_ref(info, "weight")
        if weight is None or len(shape) < 2:
            self.unknown(info, f"{info.op} at node {node.name}: weight is not a parameter")
            return
        reason = self.check_dims(x, {1}, info)
        if reason:
            self.freeze(x, reason)
            x = EMPTY
        in_ids = None if x.empty else x.ids
        groups = info.groups
        out = self.fresh(shape[1], node)
        self.spaces[node] = Space((1,), out)
        if not self.in_scope(node):
            self.freeze(out, self.out_of_scope(node))
            self.freeze(in_ids, self.out_of_scope(node))
        w_out, w_in = info.weight_out_dim, info.weight_in_dim
        if groups > 1:
            if in_ids is None or info.transposed or info.module is None:
                self.freeze(out, f"{info.op} at node {node.name}: grouped conv over fixed input channels"
                            if in_ids is None else f"{info.op} at node {node.name}: grouped "
                            f"{'transposed ' if info.transposed else 'functional '}conv")
                self.freeze(in_ids, f"{info.op} at node {node.name}: grouped conv")
            else:  # whole groups go: a group's input and output channels are one unit
                ins, outs = in_ids.reshape(groups, -1), out.reshape(groups, -1)
                members = torch.cat([ins, outs], dim=1)
                self.union(members[:, :1].expand_as(members), members)
        elif in_ids is not None:
            self.record(*weight, w_in, in_ids, "in", node)
        if in_ids is None:
            self.fixed_dim(*weight, w_in, node)
        self.record(*weight, w_out, out, "out", node)
        bias = self.param_ref(info, "bias")
        if bias is not None:
            self.record(*bias, 0, out, "out", node)

    def linear(self, info: OpInfo) -> None:
        node = info.node
        shape = meta_shape(node.meta["tensor_meta"])
        x = self.space(info.inputs[0])
        weight = self.param_ref(info, "weight")
        if weight is None:
            self.unknown(info, f"linear at node {node.name}: weight is not a parameter")
            return
        last = len(meta_shape(info.inputs[0].meta["tensor_meta"])) - 1
        reason = self.check_dims(x, {last}, info)
        if reason:
            self.freeze(x, reason)
            x = EMPTY
        out = self.fresh(shape[-1], node)
        self.spaces[node] = Space((len(shape) - 1,), out)
        if not self.in_scope(node):
            self.freeze(out, self.out_of_scope(node))
            self.freeze(x, self.out_of_scope(node))
        if not x.empty:
            self.record(*weight, 1, x.ids, "in", node)
        else:
            self.fixed_dim(*weight, 1, node)
        self.record(*weight, 0, out, "out", node)
        bias = self.param_ref(info, "bias")
        if bias is not None:
            self.record(*bias, 0, out, "out", node)

    def embedding(self, info: OpInfo) -> None:
        node = info.node
        shape = meta_shape(node.meta["tensor_meta"])
        weight = self.param_ref(info, "weight")
        if weight is None:
            self.unknown(info, f"embedding at node {node.name}: weight is not a parameter")
            return
        out = self.fresh(shape[-1], node, None if self.in_scope(node) else self.out_of_scope(node))
        self.spaces[node] = Space((len(shape) - 1,), out)
        self.record(*weight, 1, out, "out", node)

    def norm(self, info: OpInfo) -> None:
        node = info.node
        x = self.space(info.inputs[0])
        ndim = len(meta_shape(node.meta["tensor_meta"]))
        self.spaces[node] = x
        if x.empty:
            for name in ("weight", "bias", "running_mean", "running_var"):
                ref = self.param_ref(info, name)
                if ref is not None:
                    self.fixed_dim(*ref, 0, node)
            return
        op = info.op
        if op in _PER_CHANNEL_NORMS or op == "group_norm":
            reason = self.check_dims(x, {1}, info)
        elif op == "layer_norm":
            shape = info.module.normalized_shape if info.module is not None else info.params.get("normalized_shape")
            reason = self.check_dims(x, {ndim - 1}, info)
            if not reason and (isinstance(shape, fx.Node) or len(tuple(shape)) != 1):
                reason = f"layer_norm at node {node.name}: normalizes over more than the channel dim"
        else:
            reason = f"{op} at node {node.name}: mixes neighbouring channels"
        if reason:
            self.freeze(x, reason)
            return
        if not self.in_scope(node):
            self.freeze(x, self.out_of_scope(node))
        ids = x.ids
        if op == "layer_norm":
            self.norm_atoms.append(ids)  # its statistics change when channels go: not exact
            if info.module is None:
                self.resized.append(node)
        if op == "group_norm":
            num_groups = info.module.num_groups if info.module is not None else info.params.get("num_groups")
            if not isinstance(num_groups, int):
                self.freeze(ids, f"group_norm at node {node.name}: num_groups is computed")
                return
            per = ids.reshape(num_groups, -1)  # whole groups go: the others keep their statistics
            self.union(per[:, :1].expand_as(per), per)
            if info.module is None:
                self.resized.append(node)
        names = ("weight", "bias", "running_mean", "running_var")
        for name in names:
            ref = self.param_ref(info, name)
            if ref is not None:
                self.record(*ref, 0, ids, "norm", node)

    def activation(self, info: OpInfo) -> None:
        self.pass_through(info)
        x = self.space(info.inputs[0] if info.inputs else None)
        weight = self.param_ref(info, "weight") if info.op == "prelu" else None
        if weight is not None and not x.empty:
            tensor = self.param_tensor(weight)
            if tensor is not None and tensor.numel() > 1:
                reason = self.check_dims(x, {1}, info)
                if reason:
                    self.freeze(x, reason)
                else:
                    self.record(*weight, 0, x.ids, "norm", info.node)
