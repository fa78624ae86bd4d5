"""Raise functional weighted ops to module form: one dialect for every pass.

Symbolic tracing records ``F.conv2d(x, self.weight, self.bias, ...)`` as a ``call_function``
on ``get_attr`` weights whenever a module computes its conv itself: a ``Conv2d`` subclass
with its own ``forward`` (EfficientNet ports with TensorFlow "same" padding), weight
standardisation, or plain functional code. The passes know layers as ``call_module`` nodes of
the torch classes, so :func:`raise_functional_layers` rewrites each such op into a call of a
real ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d`` or ``nn.Linear`` (and, for the
``torch.export`` front end, ``nn.LayerNorm`` and ``nn.Embedding``) holding the very same
``Parameter`` objects. The module goes where the weights live: it replaces their owner when
nothing else of the owner is used by the graph, else it becomes the owner's child named after
the op (``_conv_stem.conv2d``), so ``scope``/``skip`` patterns naming the owner cover it.

Guarantees: the graph computes exactly what it did (the same torch function on the same
tensors); only ops whose weight (and bias, if any) are graph ``Parameter`` attributes and
whose other arguments are constants are raised; weights stay shared where they were and
move into the raised module (no float copy is left behind for quantization to miss). A
module the graph calls is never edited (under :func:`fxcompress.trace` it is the caller's
own object): functional ops on its weights stay as they are, except in an exported graph
(``norms_and_embeddings``), where such a layer (a weight tied to another module's, as GPT-2's
``lm_head`` to ``wte``) becomes a module of its own at the path export recorded for it, holding
the same ``Parameter``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from fxcompress.ops import Kind, OpInfo, describe

__all__ = ["raise_functional_layers"]


def _parameter(gm: fx.GraphModule, node: Any) -> nn.Parameter | None:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    owner, _, name = str(node.target).rpartition(".")
    try:
        value = getattr(gm.get_submodule(owner), name, None)
    except AttributeError:
        return None
    return value if isinstance(value, nn.Parameter) else None


def _constant(value: Any) -> bool:
    return not isinstance(value, fx.Node) and not (isinstance(value, (tuple, list))
                                                   and any(isinstance(v, fx.Node) for v in value))


def _module_for(info: OpInfo, weight: nn.Parameter, bias: nn.Parameter | None) -> nn.Module | None:
    """The torch module computing ``info``'s op with these parameters, or None."""
    p = info.params
    if info.kind is Kind.NORM:  # layer_norm only (the caller checks)
        shape = tuple(p.get("normalized_shape") or ())
        if tuple(weight.shape) != shape or (bias is not None and tuple(bias.shape) != shape):
            return None
        with torch.device("meta"):
            module = nn.LayerNorm(shape, eps=float(p.get("eps", 1e-5)), bias=bias is not None)
    elif info.kind is Kind.EMBEDDING:
        if weight.dim() != 2 or bias is not None:
            return None
        with torch.device("meta"):
            module = nn.Embedding(weight.shape[0], weight.shape[1], padding_idx=p.get("padding_idx"))
    elif info.kind is Kind.LINEAR:
        if weight.dim() != 2:
            return None
        with torch.device("meta"):
            module: nn.Module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    else:
        dims = int(p["spatial_dims"])
        if weight.dim() != dims + 2:
            return None
        groups = int(p.get("groups", 1))
        common = dict(stride=p.get("stride", 1), padding=p.get("padding", 0), dilation=p.get("dilation", 1),
                      groups=groups, bias=bias is not None)
        with torch.device("meta"):
            if info.transposed:
                cls = getattr(nn, f"ConvTranspose{dims}d")
                module = cls(weight.shape[0], weight.shape[1] * groups, tuple(weight.shape[2:]),
                             output_padding=p.get("output_padding", 0), **common)
            else:
                cls = getattr(nn, f"Conv{dims}d")
                module = cls(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), **common)
    module.weight = weight
    if bias is not None:
        module.bias = bias
    return module


def _owner_free(gm: fx.GraphModule, owner: str, mine: set[fx.Node]) -> bool:
    """Whether nothing of the module at ``owner`` but ``mine`` (get_attr nodes) is used by the graph."""
    if not owner:
        return False  # the root itself cannot be replaced
    prefix = owner + "."
    for node in gm.graph.nodes:
        if node.op in ("call_module", "get_attr") and node not in mine:
            target = str(node.target)
            if target == owner or target.startswith(prefix):
                return False
    return True


def _free_name(parent: nn.Module, base: str) -> str:
    name, i = base, 1
    while hasattr(parent, name):
        name, i = f"{base}_{i}", i + 1
    return name


def _raisable(info: OpInfo, norms_and_embeddings: bool) -> bool:
    if info.kind in (Kind.CONV, Kind.LINEAR):
        return True
    return norms_and_embeddings and (info.kind is Kind.EMBEDDING or info.op == "layer_norm")


def _child_name(info: OpInfo, weight_attr: str) -> str:
    """A raised module's name under an owner that keeps other state: ``in_proj`` for a weight named
    ``in_proj_weight`` (``nn.MultiheadAttention``'s packed projection), else the op (``conv2d``)."""
    return weight_attr[: -len("_weight")] if weight_attr.endswith("_weight") else info.op


def _recorded_path(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The module path ``torch.export`` recorded for ``node`` (its innermost ``nn_module_stack`` entry)
    when nothing in ``gm`` has that path yet: where a layer whose weight is tied to another module's
    (GPT-2's ``lm_head`` reading ``wte.weight``) goes, sharing the parameter."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path = str(list(stack.values())[-1][0])
    owner, _, name = path.rpartition(".")
    try:
        if not path or hasattr(gm.get_submodule(owner), name):
            return None
    except AttributeError:
        return None
    return path


def raise_functional_layers(gm: fx.GraphModule, *, norms_and_embeddings: bool = False) -> int:
    """Rewrite functional conv / transposed conv / linear calls on graph parameters into
    ``call_module`` nodes of the torch classes (see the module docstring); returns how many.

    ``norms_and_embeddings`` raises ``F.layer_norm`` and ``F.embedding`` on parameters too (into
    ``nn.LayerNorm`` / ``nn.Embedding``): the ``torch.export`` front end asks for it, since an
    exported graph has no modules left at all."""
    raised = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        info = describe(node, gm)
        if not _raisable(info, norms_and_embeddings) or not info.inputs or not isinstance(info.inputs[0], fx.Node):
            continue
        weight = _parameter(gm, info.weight_node)
        bias_node = info.params.get("bias")
        bias = _parameter(gm, bias_node) if bias_node is not None else None
        if weight is None or (bias_node is not None and bias is None):
            continue
        others = {k: v for k, v in info.params.items() if k not in ("weight", "bias", "channel_dim")}
        if not all(_constant(v) for v in others.values()) or len(info.inputs) != 1:
            continue
        module = _module_for(info, weight, bias)
        if module is None:
            continue
        mine = {n for n in (info.weight_node, bias_node) if isinstance(n, fx.Node)}
        owner = str(info.weight_node.target).rpartition(".")[0]  # type: ignore[union-attr]
        parent = gm.get_submodule(owner)
        called = any(n.op == "call_module" and str(n.target) == owner for n in gm.graph.nodes)
        # A weight another op reads too (tied): in an exported graph each op gets its module at its own
        # recorded path, all holding the one Parameter (the last reader takes the owner's place).
        tied = called or (norms_and_embeddings and len(info.weight_node.users) > 1)  # type: ignore[union-attr]
        if tied:  # the owner is a called module (possibly the caller's) or still read: never edited
            path = _recorded_path(gm, node) if norms_and_embeddings else None
            if path is None:
                continue
            replaces_owner = False
        else:
            replaces_owner = _owner_free(gm, owner, mine)
            weight_attr = str(info.weight_node.target).rpartition(".")[2]  # type: ignore[union-attr]
            path = owner if replaces_owner else ".".join(
                filter(None, (owner, _free_name(parent, _child_name(info, weight_attr)))))
        module.train(parent.training)
        gm.set_submodule(path, module)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(path, (info.inputs[0],))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        for attr in mine:
            if attr.users:
                continue
            gm.graph.erase_node(attr)
            still_read = any(n.op == "get_attr" and n.target == attr.target for n in gm.graph.nodes)
            if not replaces_owner and not still_read and not tied:  # the parameter now lives in the raised module
                delattr(parent, str(attr.target).rpartition(".")[2])
        raised += 1
    if raised:
        gm.delete_all_unused_submodules()
        gm.recompile()
    return raised
