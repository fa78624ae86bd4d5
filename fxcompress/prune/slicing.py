"""Physical slicing: remove units from a ``GraphModule``.

:func:`apply_removal` slices every parameter and buffer indexed by channels,
replaces each affected module with a smaller module of the same class (a real
``nn.Conv2d``, never a mask) whose attributes (``in_channels``, ``groups``,
``num_features``, ``normalized_shape``, ...) say what it now is (an attention
layer whose heads or widths change becomes a
:class:`~fxcompress.prune.attention.PrunedMultiheadAttention`), and updates
the literal size arguments of the graph (``view``/``reshape`` sizes,
``F.layer_norm``'s ``normalized_shape``, ``F.group_norm``'s ``num_groups``,
``split``/``chunk`` piece sizes).  Kept channels stay in their original order.

The caller re-runs shape propagation afterwards (the pass does).  Modules are
replaced, never mutated, so a model that shares modules with the graph (a
plain ``symbolic_trace``) is left intact.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import fx, nn

from ..errors import PassError
from ..ops import Kind, OpInfo, describe
from .attention import rebuild
from .types import ChannelGraph, Space
from .labels import scaled_size, shape_arguments

__all__ = ["apply_removal", "new_shape", "silence"]


def _kept_along(space: Space, removed: torch.Tensor) -> dict[int, torch.Tensor]:
    """Per channel dim of ``space``: bool mask of kept positions (the kept set is a rectangle)."""
    mask = ~removed[space.ids]
    kept = {}
    for axis, d in enumerate(space.dims):
        others = [a for a in range(mask.dim()) if a != axis]
        kept[d] = mask.any(dim=others) if others else mask
    if len(space.dims) > 1:
        grid = torch.ones_like(mask)
        for axis, d in enumerate(space.dims):
            view = [1] * mask.dim()
            view[axis] = -1
            grid = grid & kept[d].reshape(view)
        if not torch.equal(grid, mask):
            raise PassError("internal error: a multi-dim channel space would lose a "
                            "non-rectangular set of positions; please report this model")
    return kept


def new_shape(node: fx.Node, space: Any, removed: torch.Tensor) -> tuple[int, ...] | None:
    """The shape ``node`` will have once the removed atoms are gone."""
    meta = node.meta.get("tensor_meta")
    if not isinstance(space, Space) or not hasattr(meta, "shape"):
        return None
    shape = list(meta.shape)
    if not space.empty:
        for d, kept in _kept_along(space, removed).items():
            shape[d] = int(kept.sum())
    return tuple(shape)


def _copy_module(module: nn.Module) -> nn.Module:
    new = copy.copy(module)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = dict(module._modules)
    return new


def _set_tensor(owner: nn.Module, attr: str, value: torch.Tensor) -> None:
    old = getattr(owner, attr)
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(value.detach().clone(), requires_grad=old.requires_grad)
    elif attr in owner._buffers:
        owner._buffers[attr] = value.detach().clone()
    else:
        setattr(owner, attr, value.detach().clone())


def apply_removal(gm: fx.GraphModule, cg: ChannelGraph, removed_units: torch.Tensor) -> dict[str, int]:
    """Remove the atoms of ``removed_units`` (bool per unit) from ``gm`` in place.

    Returns counts: parameters sliced, modules replaced, nodes rewritten.
    """
    removed = removed_units[cg.unit_of] if cg.unit_of.numel() else torch.zeros(0, dtype=torch.bool)
    slices: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for (owner, attr, dim), ps in cg.params.items():
        keep = ~removed[ps.ids]
        if not keep.all():
            slices.setdefault((owner, attr), {})[dim] = keep.nonzero().reshape(-1)
    shapes = {n: new_shape(n, cg.spaces.get(n), removed) for n in gm.graph.nodes}
    copies: dict[str, nn.Module] = {}

    def writable(owner: str) -> nn.Module:
        if owner == "":
            return gm
        if owner not in copies:
            copies[owner] = _copy_module(gm.get_submodule(owner))
        return copies[owner]

    for (owner, attr), dims in slices.items():
        module = writable(owner)
        tensor = getattr(module, attr)
        for dim, keep in sorted(dims.items()):
            tensor = tensor.index_select(dim, keep)
        _set_tensor(module, attr, tensor)
    for node in gm.graph.nodes:
        if node.op == "call_module":
            _resize_module(node, gm, shapes, writable, copies)
    for owner in sorted(copies, key=lambda p: p.count(".")):
        gm.set_submodule(owner, copies[owner])
    rewritten = sum(_rewrite_literals(describe(node, gm), gm, cg, shapes, removed) for node in cg.resized)
    return {"tensors_sliced": sum(len(d) for d in slices.values()), "modules_replaced": len(copies),
            "nodes_rewritten": rewritten}


def silence(gm: fx.GraphModule, cg: ChannelGraph, removed_units: torch.Tensor) -> int:
    """Zero, in place, every consumer weight that reads a channel of ``removed_units``.

    Afterwards the removed channels contribute nothing downstream, so
    :func:`apply_removal` of the same units must leave the outputs unchanged
    (up to float round-off): the exactness check of the whole analysis.  Units
    marked ``channel_norm`` are the exception (a LayerNorm's statistics see
    every channel).  Returns the number of weight columns zeroed.
    """
    removed = removed_units[cg.unit_of]
    zeroed = 0
    with torch.no_grad():
        for ps in cg.params.values():
            if ps.role != "in":
                continue
            idx = removed[ps.ids].nonzero().reshape(-1)
            if idx.numel():
                getattr(gm.get_submodule(ps.owner), ps.attr).index_fill_(ps.dim, idx, 0.0)
                zeroed += idx.numel()
    return zeroed


def _resize_module(node: fx.Node, gm: fx.GraphModule, shapes: dict, writable: Any, copies: dict) -> None:
    """Make a module's size attributes say what its sliced tensors now are."""
    x = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    old_in = tuple(x.meta["tensor_meta"].shape) if x is not None and hasattr(x.meta.get("tensor_meta"), "shape") else None
    new_in = shapes.get(x) if x is not None else None
    old_out = tuple(node.meta["tensor_meta"].shape) if hasattr(node.meta.get("tensor_meta"), "shape") else None
    new_out = shapes.get(node)
    path = str(node.target)
    touched = path in copies or any(c.startswith(path + ".") for c in copies)  # itself or its projections
    if (old_in == new_in or new_in is None) and (old_out == new_out or new_out is None) and not touched:
        return
    info = describe(node, gm)
    if info.kind is Kind.ATTENTION and info.op == "multihead_attention":
        module = writable(path)  # heads or widths changed: the packed module cannot say so, replace it
        children = {name: copies.pop(f"{path}.{name}", child) for name, child in module.named_children()}
        copies[path] = rebuild(module, children)
    elif info.kind is Kind.CONV:
        m = writable(path)
        old_groups = m.groups
        c_out_old, c_out = old_out[1], new_out[1]
        if old_groups > 1:
            m.groups = old_groups * c_out // c_out_old
        if m.transposed:
            m.in_channels, m.out_channels = new_in[1], m.weight.shape[1] * m.groups
        else:
            m.in_channels, m.out_channels = m.weight.shape[1] * m.groups, m.weight.shape[0]
    elif info.kind is Kind.LINEAR:
        m = writable(path)
        m.in_features, m.out_features = m.weight.shape[1], m.weight.shape[0]
    elif info.kind is Kind.EMBEDDING:
        writable(path).embedding_dim = new_out[-1]
    elif info.kind is Kind.NORM and new_in is not None:
        m = writable(path)
        if info.op == "layer_norm":
            m.normalized_shape = (new_in[-1],)
        elif info.op == "group_norm":
            m.num_groups = m.num_groups * new_in[1] // old_in[1]
            m.num_channels = new_in[1]
        elif hasattr(m, "num_features"):
            m.num_features = new_in[1]
    elif info.kind is Kind.ACTIVATION and info.op == "prelu":
        m = writable(path)
        if m.weight.numel() > 1:
            m.num_parameters = m.weight.numel()


def _rewrite_literals(info: OpInfo, gm: fx.GraphModule, cg: ChannelGraph, shapes: dict, removed: torch.Tensor) -> int:
    """Update the literal size arguments of one node; returns 1 if it changed."""
    node, info_op = info.node, info.op
    if info_op in ("split", "chunk"):
        return _rewrite_split(node, cg, removed)
    if info_op in ("layer_norm", "group_norm"):
        x = node.args[0]
        old, new = tuple(x.meta["tensor_meta"].shape), shapes.get(x)
        if new is None or old == new:
            return 0
        args, kwargs = list(node.args), dict(node.kwargs)
        if info_op == "layer_norm":
            value = (new[-1],)
            key, pos = "normalized_shape", 1
        else:
            current = args[1] if len(args) > 1 else kwargs["num_groups"]
            value = current * new[1] // old[1]
            key, pos = "num_groups", 1
        if len(args) > pos:
            args[pos] = value
        else:
            kwargs[key] = value
        node.args, node.kwargs = tuple(args), kwargs
        return 1
    found = shape_arguments(info)
    new = shapes.get(node)
    if found is None or new is None:
        return 0
    start, sizes = found
    old = tuple(node.meta["tensor_meta"].shape)
    changed = False
    for i, s in enumerate(sizes):
        d = start + i
        if new[d] == old[d]:
            continue
        if isinstance(s, int) and not isinstance(s, bool) and s != -1:
            sizes[i] = new[d]
            changed = True
        elif isinstance(s, fx.Node) and (scaled := scaled_size(s, gm)) is not None:
            sizes[i] = _rescaled(node, s, scaled, old[d], new[d])  # bsz * num_heads: a new num_heads
            changed = True
    if not changed:
        return 0
    if info_op == "unflatten":
        args = list(node.args)
        if len(args) > 2:
            args[2] = tuple(sizes)
            node.args = tuple(args)
        else:
            node.kwargs = {**node.kwargs, "sizes": tuple(sizes)}
    elif "shape" in node.kwargs:
        node.kwargs = {**node.kwargs, "shape": tuple(sizes)}
    else:
        packed = len(node.args) == 2 and isinstance(node.args[1], (tuple, list, torch.Size))
        node.args = (node.args[0], tuple(sizes)) if packed else (node.args[0], *sizes)
    return 1


def _rescaled(user: fx.Node, size: fx.Node, scaled: tuple[Any, int], old: int, new: int) -> fx.Node:
    """A new ``n * K'`` node (before ``user``) for a size ``n * K`` that was ``old`` and must be ``new``.

    A new node, not an edit: the same product may size other tensors (the other
    projections, other layers) that keep or lose other channels.
    """
    factor, k = scaled
    if old % k or new % (old // k):
        raise PassError(f"internal error: {size.name} (= {old}) cannot become {new} by changing its literal {k}; "
                        f"please report this model")
    with user.graph.inserting_before(user):
        return user.graph.call_function(size.target, (factor, new // (old // k)))


def _rewrite_split(node: fx.Node, cg: ChannelGraph, removed: torch.Tensor) -> int:
    """``chunk``/``split`` along the channels become ``split`` with the kept piece sizes."""
    meta = node.meta["tensor_meta"]
    dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0) % len(meta[0].shape)
    old = [int(m.shape[dim]) for m in meta]
    new = [int(_kept_along(s, removed)[dim].sum()) if isinstance(s, Space) and dim in s.dims else o
           for s, o in zip(cg.spaces.get(node), old)]
    if new == old:
        return 0
    node.target = "split" if node.op == "call_method" else torch.split
    node.args = (node.args[0], new, dim)
    node.kwargs = {}
    return 1
