"""Label tensors: channel indices mapped through ops by running the ops themselves.

A *label tensor* has a node's shape and holds, at every element, the atom of
the channel it belongs to (``-1`` where there is none).  Ops that only move
elements (reshape, view, flatten, permute, transpose, getitem, split, chunk),
and reductions over dims other than the channels, are executed on labels, and
the dims along which the result varies are its channel dims: offsets, flattening, shuffles and head splits are mapped by
torch itself.  :class:`LabelOps` is the part of the
:class:`~fxcompress.prune.rules.Analyzer` that does this; it relies on the
analyzer's state declared by :class:`~fxcompress.prune.types.RuleState`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import fx

from ..ops import Kind, OpInfo, describe, meta_shape
from .sizes import CountedSize, annotate_sizes, provenance
from .types import EMPTY, RuleState, Space

__all__ = ["LabelOps", "shape_arguments", "scaled_size"]

# The analyzer's state, declared for type checkers only (at run time the Analyzer has it).
_State = RuleState if TYPE_CHECKING else object


class LabelOps(_State):
    """Label-tensor execution and the checks on run-time sizes (a mixin of the analyzer)."""

    def labels(self, node: fx.Node) -> Any:
        space = self.spaces.get(node)
        meta = node.meta.get("tensor_meta")
        if isinstance(space, tuple):
            return tuple(self._expand(s, m) for s, m in zip(space, meta))
        if isinstance(space, Space):
            return self._expand(space, meta)
        return self.values.get(node)

    @staticmethod
    def _expand(space: Space | None, meta: Any) -> Any:
        shape = meta_shape(meta)
        if shape is None or space is None:
            return None
        if space.empty:
            return torch.full((), -1, dtype=torch.long).expand(shape)
        view = [shape[d] if d in space.dims else 1 for d in range(len(shape))]
        return space.ids.reshape(view).expand(shape)

    def from_labels(self, labels: torch.Tensor, node: fx.Node) -> Space:
        """The space of a label tensor: the dims along which the atoms vary."""
        if labels.dim() == 0 or labels.numel() == 0:
            return EMPTY
        first = labels
        dims = []
        for d in range(labels.dim()):
            if labels.shape[d] > 1 and not (labels == labels.narrow(d, 0, 1)).all():
                dims.append(d)
        for d in range(labels.dim()):
            if d not in dims:
                first = first.narrow(d, 0, 1)
        ids = first.reshape([labels.shape[d] for d in dims]).clone() if dims else first.reshape(())
        if not dims:
            if int(ids) >= 0:  # one channel broadcast everywhere: keep it, its size cannot change
                self.freeze(ids, f"{node.name}: a single channel spread over a tensor")
            return EMPTY
        if (ids < 0).any():
            self.freeze(ids, f"{node.name}: channels mixed with fixed positions")
            return EMPTY
        return Space(tuple(dims), ids)

    def execute(self, node: fx.Node, dense: bool = False) -> Any:
        """Run ``node`` on label tensors (for tensor inputs) and concrete values.

        ``dense`` materialises the (broadcast) label tensors first, for ops
        such as ``view`` that need real strides.
        """
        def value(n: fx.Node) -> Any:
            v = self.labels(n)
            return v.contiguous() if dense and isinstance(v, torch.Tensor) else v

        args = fx.node.map_arg(node.args, value)
        kwargs = fx.node.map_arg(node.kwargs, value)
        if node.op == "call_module":
            return self.gm.get_submodule(str(node.target))(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], str(node.target))(*args[1:], **kwargs)
        return node.target(*args, **kwargs)

    def _size_value(self, node: fx.Node) -> Any:
        """Evaluate a non-tensor node; sizes read off channel dims become :class:`CountedSize`."""
        value = self.execute(node)
        src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        space = self.space(src)
        if space.empty:
            return value
        info = describe(node, self.gm)
        reads_size = info.kind is Kind.SHAPE and (
            info.op == "size" or info.op == "getattr" and info.params.get("name") == "shape")
        if not reads_size:
            return value
        index = node.args[1] if len(node.args) > 1 and isinstance(node.args[1], int) else node.kwargs.get("dim")
        ndim = len(meta_shape(src.meta["tensor_meta"]))
        return annotate_sizes(value, space.dims, space.ids, index % ndim if isinstance(index, int) else None)

    def _check_counted_sizes(self, info: OpInfo) -> None:
        """A channel count read at run time may only shape a tensor holding those same channels."""
        node = info.node
        counted = provenance([self.values.get(a) for a in node.all_input_nodes])
        if not counted:
            return
        x = self.space(info.inputs[0] if info.inputs else None)
        mine = None if x.empty else torch.unique(x.ids)
        for atoms in counted:
            if info.kind is Kind.RESHAPE and mine is not None and torch.equal(torch.unique(atoms), mine):
                continue
            self.freeze(atoms, f"{info.op} at node {node.name}: shaped by a channel count read at run time")

    def label_op(self, info: OpInfo) -> None:
        """Reshape/permute/identity/getitem/split: run the op on labels."""
        node = info.node
        before = self.space(info.inputs[0] if info.inputs else None)
        try:
            out = self.execute(node, dense=info.op in ("view", "reshape"))
        except Exception as exc:
            self.unknown(info, f"{info.op} at node {node.name}: cannot map channels ({type(exc).__name__})")
            return
        if isinstance(out, (tuple, list)):
            self.spaces[node] = tuple(self.from_labels(o, node) if isinstance(o, torch.Tensor) else None
                                      for o in out)
            return
        space = self._with_counted_dims(info, self.from_labels(out, node), tuple(out.shape))
        if len(space.dims) > len(before.dims):
            self._keep_rectangular(info, space)
        literal = _literal_sizes(info)
        if literal is not None and node not in self.resized and any(_is_literal(literal.get(d)) for d in space.dims):
            self.resized.append(node)  # a channel count written out (ViT's reshape(n, hidden_dim, -1))
        if literal is not None and not self._computed_sizes_follow(info, space, literal):
            return
        self.spaces[node] = space

    def _computed_sizes_follow(self, info: OpInfo, space: Space, literal: dict[int, Any]) -> bool:
        """A channel dim sized by a run-time value must be able to follow the channels.

        Fine: a count of those channels (:class:`CountedSize`, checked elsewhere) or a
        product ``n * K`` of a size and a literal (``nn.MultiheadAttention``'s ``bsz *
        num_heads``), whose literal slicing updates.  Anything else keeps its value when
        channels go, so they are frozen.  False (and the node's space set) when frozen.
        """
        node = info.node
        for d in space.dims:
            s = literal.get(d)
            if not isinstance(s, fx.Node) or isinstance(self.values.get(s), CountedSize) or scaled_size(s, self.gm):
                continue
            self.freeze(space, f"{info.op} at node {node.name}: channel dim {d} is sized by {s.name}, a "
                               f"run-time value that does not follow the channels")
            self.spaces[node] = EMPTY
            return False
        if any(isinstance(literal.get(d), fx.Node) and scaled_size(literal[d], self.gm) for d in space.dims) \
                and node not in self.resized:
            self.resized.append(node)
        return True

    def getitem(self, info: OpInfo) -> None:
        node = info.node
        src = info.inputs[0]
        space = self.spaces.get(src)
        index = info.params.get("index")
        if isinstance(space, tuple):
            self.spaces[node] = space[index] if isinstance(index, int) else self.empty_like(node.meta["tensor_meta"])
            return
        touched = _indexed_dims(index, len(meta_shape(src.meta["tensor_meta"])))
        if touched is None or touched & set(self.space(src).dims):
            self.unknown(info, f"getitem at node {node.name}: indexes into the channels")
            return
        self.label_op(info)

    def split(self, info: OpInfo) -> None:
        node = info.node
        x = self.space(info.inputs[0])
        ndim = len(meta_shape(info.inputs[0].meta["tensor_meta"]))
        dim = info.params.get("dim", 0)
        if not isinstance(dim, int):
            self.unknown(info, f"{info.op} at node {node.name}: computed split dim")
            return
        if dim % ndim in x.dims:
            sizes = info.params.get("split_size_or_sections", info.params.get("chunks"))
            if info.op == "unbind" or len(x.dims) > 1 or _has_node(sizes):
                self.unknown(info, f"{info.op} at node {node.name}: splits the channels irregularly")
                return
            self.resized.append(node)  # piece sizes follow the channels kept in each piece
        self.label_op(info)

    def select(self, info: OpInfo) -> None:
        """``aten.select.int(x, dim, index)`` (export's ``x[i]``, as in ``nn.MultiheadAttention``'s
        packed q/k/v): along a channel dim only if that dim is kept whole (every unit spans all
        its positions, so ``index`` stays valid once channels go); the other dims as getitem."""
        node = info.node
        x = self.space(node.args[0] if node.args else None)
        dim, index = (list(node.args[1:3]) + [None, None])[:2]
        if not (isinstance(dim, int) and isinstance(index, int)):
            self.unknown(info, f"select at node {node.name}: computed dim or index")
            return
        ndim = len(meta_shape(node.args[0].meta["tensor_meta"]))
        if dim % ndim in x.dims:
            moved = x.ids.movedim(x.dims.index(dim % ndim), 0)
            for k in range(1, moved.shape[0]):  # the dim keeps all its positions: they go together
                self.union(moved[0], moved[k])
        self.label_op(info)

    def reduction(self, info: OpInfo) -> None:
        """A reduction over other dims than the channels: the labels' max says where they went."""
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

    def _with_counted_dims(self, info: OpInfo, space: Space, shape: tuple[int, ...]) -> Space:
        """Add size-1 dims sized by a run-time channel count (``c // g`` when ``c == g``).

        Labels cannot vary along a size-1 dim, but such a dim is still part of
        the split channel dim: its size changes when channels go.
        """
        sizes = _literal_sizes(info)
        if space.empty or sizes is None:
            return space
        counted = {d: self.values.get(s) if isinstance(s, fx.Node) else s for d, s in sizes.items()}
        extra = [d for d, s in counted.items()
                 if isinstance(s, CountedSize) and d not in space.dims and d < len(shape) and shape[d] == 1]
        if not extra:
            return space
        dims = tuple(sorted(space.dims + tuple(extra)))
        return Space(dims, space.ids.reshape([shape[d] for d in dims]))

    def _keep_rectangular(self, info: OpInfo, space: Space) -> None:
        """A channel dim split into several dims (channel shuffle, head split).

        Removing channels must leave a rectangle, so along every dim but one
        (the free one) the positions are joined.  The free dim is the one whose
        size is computed at run time (``-1`` or from ``x.size()``); if every
        size is a literal, the last one (the heads dim of a head split that
        feeds attention), whose literal is then updated.
        """
        node = info.node
        literal = _literal_sizes(info)
        free = [d for d in space.dims if literal is None or not _is_literal(literal.get(d))]
        # all literal: the last dim, unless this is a head split feeding attention (view(b, s, 4, 8)
        # -> scaled_dot_product_attention): there the heads dim is free and head_dim is kept whole
        keep_free = free[-1] if free else space.dims[0] if len(space.dims) == 2 and feeds_attention(node, self.gm) \
            else space.dims[-1]
        ids = space.ids
        for axis, d in enumerate(space.dims):
            if d == keep_free:
                continue
            moved = ids.movedim(axis, 0)
            for k in range(1, moved.shape[0]):
                self.union(moved[0], moved[k])
        if literal is not None:
            self.resized.append(node)


def scaled_size(node: fx.Node, gm: fx.GraphModule) -> tuple[Any, int] | None:
    """(the other factor, K) if ``node`` is ``n * K`` or ``K * n`` for a literal int ``K``, else None."""
    info = describe(node, gm)
    if info.op != "mul" or len(info.inputs) != 2:
        return None
    a, b = info.inputs
    if _is_literal(b) and isinstance(a, fx.Node):
        return a, b
    if _is_literal(a) and isinstance(b, fx.Node):
        return b, a
    return None


def feeds_attention(node: fx.Node, gm: fx.GraphModule, depth: int = 4) -> bool:
    """Whether ``node`` reaches a q/k/v input of ``F.scaled_dot_product_attention`` through
    transposes, permutes and identities only (at most ``depth`` of them)."""
    for user in node.users:
        info = describe(user, gm)
        if info.op == "scaled_dot_product_attention" and node in info.inputs[:3]:
            return True
        if depth > 0 and info.kind in (Kind.PERMUTE, Kind.IDENTITY) and feeds_attention(user, gm, depth - 1):
            return True
    return False


def _has_node(v: Any) -> bool:
    found = []
    fx.node.map_arg(v, lambda n: found.append(n) or n)
    return bool(found)


def _indexed_dims(index: Any, ndim: int) -> set[int] | None:
    """Input dims that a getitem index narrows (None if it cannot tell)."""
    items = index if isinstance(index, tuple) else (index,)
    consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
    touched: set[int] = set()
    d = 0
    for item in items:
        if item is None:
            continue
        if item is Ellipsis:
            d += ndim - consumed
            continue
        if isinstance(item, fx.Node):
            return None
        if not (isinstance(item, slice) and item == slice(None)):
            touched.add(d)
        d += 1
    return touched


def _is_literal(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v != -1


def shape_arguments(info: OpInfo) -> tuple[int, list] | None:
    """(first output dim, size list) of a view/reshape/unflatten node, or None."""
    node, info_name = info.node, info.op
    if info_name in ("view", "reshape"):
        rest = list(node.args[1:])
        if "shape" in node.kwargs:
            rest = [node.kwargs["shape"]]
        if len(rest) == 1 and isinstance(rest[0], (tuple, list, torch.Size)):
            return 0, list(rest[0])
        return 0, rest
    if info_name == "unflatten":
        dim, sizes = (list(node.args[1:3]) + [node.kwargs.get("dim"), node.kwargs.get("sizes")])[:2]
        ndim = len(meta_shape(node.args[0].meta["tensor_meta"]))
        return (dim % ndim if isinstance(dim, int) else 0), list(sizes or [])
    return None


def _literal_sizes(info: OpInfo) -> dict[int, Any] | None:
    found = shape_arguments(info)
    if found is None:
        return None
    start, sizes = found
    return {start + i: s for i, s in enumerate(sizes)}


