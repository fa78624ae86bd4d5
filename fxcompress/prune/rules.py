"""One channel rule per op kind (through :func:`fxcompress.ops.describe`).

:class:`Analyzer` walks the graph once, in order, and gives every tensor node
its :class:`~fxcompress.prune.types.Space`.  Ops that only rearrange
elements (reshape, permute, getitem, split, ...) are run for real on a
*label tensor* that holds each element's atom, so channel indices are mapped
through offsets, flattening, shuffles and head splits by torch itself rather
than by formulas of ours.  Every op without a rule freezes the channels it
touches, with the op and node named in the reason: never guess.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import fx

from ..ops import Kind, OpInfo, describe, meta_shape, tensor_shape
from ..pass_base import module_path_of
from .heads import AttentionRule
from .labels import LabelOps
from .types import EMPTY, ParamSlice, Space

__all__ = ["Analyzer"]

_LABEL_OPS = (Kind.RESHAPE, Kind.PERMUTE)
_PER_CHANNEL_NORMS = ("batch_norm", "instance_norm")


def _owner_attr(target: str) -> tuple[str, str]:
    owner, _, attr = target.rpartition(".")
    return owner, attr


class Analyzer(LabelOps, AttentionRule):
    """Builds atoms, unions ("same channel" edges), frozen atoms and parameter slices."""

    def __init__(self, gm: fx.GraphModule, in_scope: Callable[[fx.Node], bool]) -> None:
        self.gm = gm
        self.in_scope = in_scope
        self.n_atoms = 0
        self.edges: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.frozen: dict[int, str] = {}
        self.norm_atoms: list[torch.Tensor] = []
        self.spaces: dict[fx.Node, Any] = {}
        self.values: dict[fx.Node, Any] = {}
        self.params: dict[tuple[str, str, int], ParamSlice] = {}
        self.sources: dict[str, torch.Tensor] = {}
        self.source_of: dict[str, tuple[str, str]] = {}  # source key -> (node name, part)
        self.resized: list[fx.Node] = []
        self.order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
        # parameter dims that some call meets with fixed channels -> why (see fixed_dim)
        self.fixed: dict[tuple[str, str, int], str] = {}

    # -- atoms ---------------------------------------------------------------
    def fresh(self, n: int, node: fx.Node, frozen: str | None = None, part: str = "") -> torch.Tensor:
        """``n`` new atoms made by ``node``; ``part`` names a second kind of channels it makes (heads)."""
        ids = torch.arange(self.n_atoms, self.n_atoms + n)
        self.n_atoms += n
        key = f"{node.name}:{part}" if part else node.name
        self.source_of[key] = (node.name, part)
        prev = self.sources.get(key)
        self.sources[key] = ids if prev is None else torch.cat([prev, ids])
        if frozen:
            self.freeze(ids, frozen)
        return ids

    def out_of_scope(self, node: fx.Node) -> str:
        """The freeze reason for a layer outside scope/skip, named by module path as scope patterns are."""
        return f"{module_path_of(node) or node.name}: outside the pass's scope"

    def union(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = a.reshape(-1), b.reshape(-1)
        if a.numel() and not torch.equal(a, b):
            self.edges.append((a, b))

    def freeze(self, ids: torch.Tensor | Space | None, reason: str) -> None:
        if isinstance(ids, Space):
            ids = None if ids.empty else ids.ids
        if ids is None:
            return
        for atom in ids.reshape(-1).unique().tolist():
            if atom >= 0:
                self.frozen.setdefault(atom, reason)

    def freeze_all(self, value: Any, reason: str) -> None:
        """Freeze every atom reachable in a (nested) argument structure of nodes."""
        def visit(n: fx.Node) -> fx.Node:
            self._freeze_space(self.spaces.get(n), reason)
            return n
        fx.node.map_arg(value, visit)

    def _freeze_space(self, space: Any, reason: str) -> None:
        if isinstance(space, Space):
            self.freeze(space, reason)
        elif isinstance(space, tuple):
            for s in space:
                self._freeze_space(s, reason)

    def record(self, owner: str, attr: str, dim: int, ids: torch.Tensor, role: str, node: fx.Node) -> None:
        """Parameter ``owner.attr`` is sliced along ``dim`` by ``ids``; one param, one index set."""
        key = (owner, attr, dim)
        if key in self.fixed:
            self.freeze(ids, self.fixed[key])
        prev = self.params.get(key)
        if prev is not None:  # a module (or constant) used twice: its channels are the same channels
            self.union(prev.ids, ids)
            return
        self.params[key] = ParamSlice(owner, attr, dim, ids.reshape(-1), role, node.name)

    def fixed_dim(self, owner: str, attr: str, dim: int, node: fx.Node) -> None:
        """Parameter ``owner.attr`` meets channels that never change along ``dim`` at ``node``
        (its input there carries none that can go, e.g. a graph input).

        A module called twice (the same object under two names, or reused) has one
        weight for both calls: if another call slices that dim, this call would break,
        so the channels recorded for it anywhere are frozen.
        """
        key = (owner, attr, dim)
        reason = (f"{owner or '(root)'}.{attr} is used by more than one call, and at node {node.name} its dim "
                  f"{dim} meets channels that are fixed")
        self.fixed.setdefault(key, reason)
        prev = self.params.get(key)
        if prev is not None:
            self.freeze(prev.ids, reason)

    def space(self, value: Any) -> Space:
        s = self.spaces.get(value) if isinstance(value, fx.Node) else None
        return s if isinstance(s, Space) else EMPTY

    # -- the walk ---------------------------------------------------------------
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            self.visit(node)

    def visit(self, node: fx.Node) -> None:
        meta = node.meta.get("tensor_meta")
        if node.op == "output":
            self.freeze_all(node.args, "model output (output shapes never change)")
            return
        if meta is None:  # a non-tensor value (sizes, flags): evaluate it for the shape ops that use it
            try:
                self.values[node] = self._size_value(node) if node.op not in ("placeholder", "get_attr") else None
            except Exception:  # a value we cannot compute: shape ops that need it freeze instead
                self.values[node] = None
            return
        if node.op in ("placeholder", "get_attr"):
            self.spaces[node] = self.empty_like(meta)
            return
        info = describe(node, self.gm)
        self._check_counted_sizes(info)
        rule = _RULES.get(info.kind)
        if rule is None:
            self.unknown(info, f"{info.op} at node {node.name}: channel semantics unknown")
        else:
            rule(self, info)

    def empty_like(self, meta: Any) -> Any:
        if meta_shape(meta) is not None:
            return EMPTY
        if isinstance(meta, (tuple, list)):
            return tuple(self.empty_like(m) for m in meta)
        return None

    def unknown(self, info: OpInfo, reason: str) -> None:
        node = info.node
        self.freeze_all((node.args, node.kwargs), reason)
        self.spaces[node] = self.empty_like(node.meta.get("tensor_meta"))

    def pass_through(self, info: OpInfo) -> None:
        self.spaces[info.node] = self.space(info.inputs[0] if info.inputs else None)

    # -- rules ------------------------------------------------------------------
    def conv(self, info: OpInfo) -> None:
        node = info.node
        shape = meta_shape(node.meta["tensor_meta"])
        x = self.space(info.inputs[0])
        weight = self._param_ref(info, "weight")
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
        bias = self._param_ref(info, "bias")
        if bias is not None:
            self.record(*bias, 0, out, "out", node)

    def linear(self, info: OpInfo) -> None:
        node = info.node
        shape = meta_shape(node.meta["tensor_meta"])
        x = self.space(info.inputs[0])
        weight = self._param_ref(info, "weight")
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
        bias = self._param_ref(info, "bias")
        if bias is not None:
            self.record(*bias, 0, out, "out", node)

    def embedding(self, info: OpInfo) -> None:
        node = info.node
        shape = meta_shape(node.meta["tensor_meta"])
        weight = self._param_ref(info, "weight")
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
                ref = self._param_ref(info, name)
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
            ref = self._param_ref(info, name)
            if ref is not None:
                self.record(*ref, 0, ids, "norm", node)

    def activation(self, info: OpInfo) -> None:
        self.pass_through(info)
        x = self.space(info.inputs[0] if info.inputs else None)
        weight = self._param_ref(info, "weight") if info.op == "prelu" else None
        if weight is not None and not x.empty:
            tensor = self._tensor(weight)
            if tensor is not None and tensor.numel() > 1:
                reason = self.check_dims(x, {1}, info)
                if reason:
                    self.freeze(x, reason)
                else:
                    self.record(*weight, 0, x.ids, "norm", info.node)

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

    def reduction(self, info: OpInfo) -> None:
        node = info.node
        x = self.space(info.inputs[0])
        ndim = len(meta_shape(info.inputs[0].meta["tensor_meta"]))
        dim = info.params.get("dim")
        dims = set(range(ndim)) if dim is None else {d % ndim for d in ((dim,) if isinstance(dim, int) else dim)}
        if dims & set(x.dims):
            self.unknown(info, f"{info.op} at node {node.name}: reduces over the channels")
            return
        keepdim = bool(info.params.get("keepdim", False))
        labels = self._expand(x, info.inputs[0].meta["tensor_meta"])
        out = torch.amax(labels, dim=tuple(sorted(dims)), keepdim=keepdim) if dims else labels
        self.spaces[node] = self.from_labels(out, node)

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
        constants = [self._constant(t, dims, ndim) for t, s in zip(tensors, spaces) if s.empty]
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
            ref = self._constant(v, dims, n)
            if ref is not None:
                self.record(*ref, ids, "const", node)
            else:
                self.freeze(ids, f"{info.op} at node {node.name}: combined with fixed channels of {v.name}")
        self.spaces[node] = Space(dims, ids)

    def attention(self, info: OpInfo) -> None:
        if info.op == "multihead_attention" and info.module is not None:
            self.multihead_attention(info)  # heads are units: see fxcompress/prune/heads.py
            return
        why = {"shifted_window_attention": "derives head_dim from its input width"}.get(
            info.op, "mixes channels across heads")
        self.unknown(info, f"{info.op} at node {info.node.name}: {why}")

    # -- helpers ----------------------------------------------------------------
    def _constant(self, value: Any, dims: tuple[int, ...], ndim: int) -> tuple[str, str, int] | None:
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
        owner, attr = _owner_attr(str(value.target))
        tensor = self._tensor((owner, attr))
        return (owner, attr, dim) if tensor is not None and tensor.shape[dim] == size else None

    def check_dims(self, x: Space, allowed: set[int], info: OpInfo) -> str | None:
        if x.empty or set(x.dims) <= allowed:
            return None
        return f"{info.op} at node {info.node.name}: channels arrive on dims {x.dims}, expected {sorted(allowed)}"

    def _param_ref(self, info: OpInfo, name: str) -> tuple[str, str] | None:
        """(owner, attr) of a module's parameter/buffer or of a get_attr argument."""
        if info.module is not None:
            t = getattr(info.module, name, None)
            return (str(info.node.target), name) if isinstance(t, torch.Tensor) else None
        ref = info.params.get(name)
        if ref is None and name == "weight" and info.op == "prelu" and len(info.node.args) > 1:
            ref = info.node.args[1]
        if isinstance(ref, fx.Node) and ref.op == "get_attr":
            return _owner_attr(str(ref.target))
        return None

    def _tensor(self, ref: tuple[str, str]) -> torch.Tensor | None:
        owner = self.gm.get_submodule(ref[0])
        t = getattr(owner, ref[1], None)
        return t if isinstance(t, torch.Tensor) else None


_RULES: dict[Kind, Callable[[Analyzer, OpInfo], None]] = {
    Kind.CONV: Analyzer.conv,
    Kind.LINEAR: Analyzer.linear,
    Kind.EMBEDDING: Analyzer.embedding,
    Kind.NORM: Analyzer.norm,
    Kind.ACTIVATION: Analyzer.activation,
    Kind.SOFTMAX: Analyzer.softmax,
    Kind.POOL: Analyzer.pool,
    Kind.REDUCTION: Analyzer.reduction,
    Kind.GETITEM: Analyzer.getitem,
    Kind.SPLIT: Analyzer.split,
    Kind.CONCAT: Analyzer.concat,
    Kind.ELEMENTWISE: Analyzer.elementwise,
    Kind.ATTENTION: Analyzer.attention,
    Kind.IDENTITY: Analyzer.pass_through,
    **{k: Analyzer.label_op for k in _LABEL_OPS},
}
