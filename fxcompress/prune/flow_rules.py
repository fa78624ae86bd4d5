"""The channel rules of ops that channels flow through: softmax, pools, concat, elementwise.

These make no channels: they pass them on (pools, softmax), lay them side by
side (concat along the channels) or join them ("the same channel": the operands
of a residual add or an SE multiply, inputs concatenated along another dim),
and slice the constants combined with them (a layer scale, a position
embedding, ViT's class token).  A mixin of :class:`~fxcompress.prune.rules.Analyzer`,
written against :class:`~fxcompress.prune.types.RuleState`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import fx

from ..ops import OpInfo, describe, meta_shape, tensor_shape
from .state import owner_attr
from .types import EMPTY, RuleState, Space

__all__ = ["FlowRules"]

# The analyzer's state, declared for type checkers only (at run time the Analyzer has it).
_State = RuleState if TYPE_CHECKING else object


class FlowRules(_State):
    """Rules for ``Kind.SOFTMAX``, ``POOL``, ``CONCAT`` and ``ELEMENTWISE``."""

    def softmax(self, info: OpInfo) -> None:
        self.pass_through(info)
        x = self.spaces[info.node]
        dim = info.params.get("dim")
        ndim = len(meta_shape(info.node.meta["tensor_meta"]))
        if isinstance(dim, int) and dim % ndim in x.dims:
            self.freeze(x, f"softmax at node {info.node.name}: normalizes over the channels")

    def pool(self, info: OpInfo) -> None:
        x = self.space(info.inputs[0])
        reason = self.check_dims(x, {1}, info)
        if reason:
            self.unknown(info, reason)
        else:
            self.spaces[info.node] = x

    def concat(self, info: OpInfo) -> None:
        node = info.node
        tensors = info.inputs[0] if info.inputs and isinstance(info.inputs[0], (list, tuple)) else info.inputs
        if info.op != "cat" or not tensors:
            self.unknown(info, f"{info.op} at node {node.name}: channel semantics unknown")
            return
        ndim = len(meta_shape(node.meta["tensor_meta"]))
        dim = info.params.get("dim", 0)
        if not isinstance(dim, int):
            self.unknown(info, f"cat at node {node.name}: computed dim")
            return
        dim %= ndim
        spaces = [self.space(t) for t in tensors]
        carried = {s.dims for s in spaces if not s.empty}
        if not carried:
            self.spaces[node] = EMPTY
            return
        if any(dim in dims for dims in carried):  # concatenated channels: segments at offsets
            if carried != {(dim,)}:
                self.unknown(info, f"cat at node {node.name}: channels on several dims")
                return
            parts = []
            for t, s in zip(tensors, spaces):
                if s.empty:
                    n = meta_shape(t.meta["tensor_meta"])[dim] if isinstance(t, fx.Node) else 0
                    s = Space((dim,), self.fresh(n, node, f"cat at node {node.name}: joined with fixed "
                                                          f"channels of {getattr(t, 'name', t)}"))
                parts.append(s.ids)
            self.spaces[node] = Space((dim,), torch.cat(parts))
            return
        # along another dim: the same channels (a constant such as ViT's class token is sliced with them)
        dims = next(iter(carried))
        constants = [self.constant_ref(t, dims, ndim) for t, s in zip(tensors, spaces) if s.empty]
        if len(carried) > 1 or None in constants:
            self.unknown(info, f"cat at node {node.name}: joins tensors whose channels differ")
            return
        ids = next(s.ids for s in spaces if not s.empty)
        for s in spaces:
            if not s.empty:
                self.union(ids, s.ids)
        for ref in constants:
            self.record(*ref, ids, "const", node)
        self.spaces[node] = Space(dims, ids)

    def elementwise(self, info: OpInfo) -> None:
        node = info.node
        shape = meta_shape(node.meta["tensor_meta"])
        n = len(shape)
        operands = [v for v in info.inputs if isinstance(v, fx.Node) and meta_shape(v.meta.get("tensor_meta"))]
        dim_sets = set()
        for v in operands:
            vshape = meta_shape(v.meta["tensor_meta"])
            off = n - len(vshape)
            s = self.space(v)
            if s.empty:
                continue
            full = tuple(d + off for d in s.dims if vshape[d] == shape[d + off])
            spread = [d for d in s.dims if vshape[d] != shape[d + off]]
            if spread:
                self.freeze(s, f"{info.op} at node {node.name}: one channel broadcast over many")
                continue
            dim_sets.add(full)
        if len(dim_sets) != 1:
            if dim_sets:
                self.unknown(info, f"{info.op} at node {node.name}: operands hold channels on different dims")
            else:
                self.spaces[node] = EMPTY
            return
        dims = next(iter(dim_sets))
        ids = None
        for v in operands:
            s = self.space(v)
            if not s.empty and tuple(d + n - len(meta_shape(v.meta["tensor_meta"])) for d in s.dims) == dims:
                ids = s.ids if ids is None else ids
                self.union(ids, s.ids)
        for v in operands:
            vshape = meta_shape(v.meta["tensor_meta"])
            off = n - len(vshape)
            if not self.space(v).empty or all(d - off < 0 or vshape[d - off] == 1 for d in dims):
                continue
            ref = self.constant_ref(v, dims, n)
            if ref is not None:
                self.record(*ref, ids, "const", node)
            else:
                self.freeze(ids, f"{info.op} at node {node.name}: combined with fixed channels of {v.name}")
        self.spaces[node] = Space(dims, ids)

    def constant_ref(self, value: Any, dims: tuple[int, ...], ndim: int) -> tuple[str, str, int] | None:
        """(owner, attr, dim) of a constant holding the channels of dim ``dims[0]`` of a rank-``ndim`` result.

        ``value`` is a ``get_attr`` (a layer scale, a position embedding) or an
        ``expand`` of one that keeps that dim (``-1``: ViT's class token),
        broadcast against the result from the right.  None for anything else.
        """
        shape = meta_shape(value.meta.get("tensor_meta")) if isinstance(value, fx.Node) else None
        dim = dims[0] - (ndim - len(shape)) if shape is not None and len(dims) == 1 else -1
        if dim < 0:
            return None
        size = shape[dim]
        expand = describe(value, self.gm)
        if expand.op == "expand" and expand.inputs and isinstance(expand.inputs[0], fx.Node):
            sizes = tuple(expand.params.get("sizes", ()))
            source = tensor_shape(expand.inputs[0])
            if source is None or len(sizes) != len(shape) or sizes[dim] != -1:
                return None
            value, dim = expand.inputs[0], dim - (len(shape) - len(source))
        if value.op != "get_attr" or dim < 0:
            return None
        owner, attr = owner_attr(str(value.target))
        tensor = self.param_tensor((owner, attr))
        return (owner, attr, dim) if tensor is not None and tensor.shape[dim] == size else None
