""":func:`describe`: a node of a captured graph, read through the tables of :mod:`.tables`."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Iterable

import torch
from torch import fx, nn

from .effects import effects_of
from .info import Kind, NotPlain, OpInfo
from .plain import not_plain
from .tables import (
    FIRST_DATA_ALIASES, PARAM_DEFAULTS, TORCH_MODULES, function_entry, method_entry, module_rule,
)

__all__ = ["describe", "describe_module", "attr_tensor", "attr_value", "tensor_shape", "meta_shape", "layers_inside", "WEIGHTED_KINDS"]


def _bind(node: fx.Node, data_names: tuple[str, ...], names: tuple[str, ...]) -> tuple[tuple, dict[str, Any]]:
    """Split a node's args and kwargs into data inputs and named parameters."""
    n_data = len(data_names)
    data = list(node.args[:n_data])
    rest = node.args[n_data:]
    params: dict[str, Any] = {}
    for i, name in enumerate(names):
        if name.startswith("*"):
            # x.view(b, -1) and x.view((b, -1)) both become shape=(b, -1).
            packed = tuple(rest[i:])
            if len(packed) == 1 and isinstance(packed[0], (tuple, list, torch.Size)):
                packed = tuple(packed[0])
            if packed:
                params[name[1:]] = packed
            break
        if i < len(rest):
            params[name] = rest[i]
    for key, value in node.kwargs.items():
        slot = data_names.index(key) if key in data_names else (0 if key in FIRST_DATA_ALIASES else None)
        if slot is not None:
            data += [None] * (slot + 1 - len(data))
            data[slot] = value
        else:
            params[key.lstrip("*")] = value
    return tuple(data), params


@functools.lru_cache(maxsize=None)
def _signature_defaults(target: Callable) -> dict[str, Any]:
    """The defaults in ``target``'s Python signature ({} for builtins without one)."""
    try:
        parameters = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def attr_value(gm: nn.Module, target: str) -> Any:
    """What ``gm`` holds at the dotted ``target`` of a ``get_attr`` or ``call_module`` node
    (a tensor, a module, any attribute); AttributeError when nothing is there."""
    owner, _, attr = target.rpartition(".")
    module = gm.get_submodule(owner)
    if not hasattr(module, attr):
        raise AttributeError(f"{type(module).__name__} {owner or '(root)'!r} has no attribute {attr!r}")
    return getattr(module, attr)


def attr_tensor(gm: nn.Module, value: Any) -> torch.Tensor | None:
    """The tensor a ``get_attr`` node reads (or ``value`` itself when it is a tensor), else None."""
    if isinstance(value, fx.Node) and value.op == "get_attr":
        try:
            t = attr_value(gm, str(value.target))
        except AttributeError:
            return None
        return t if isinstance(t, torch.Tensor) else None
    return value if isinstance(value, torch.Tensor) else None


def _module_info(node: fx.Node, m: nn.Module, kind: Kind, op: str, params: dict[str, Any],
                 weight: Any = None, bias: Any = None, **plainness: Any) -> OpInfo:
    """Module calls: positional args and tensor-valued kwargs are data, other kwargs parameters."""
    inputs = tuple(node.args) + tuple(v for v in node.kwargs.values() if isinstance(v, fx.Node))
    extra = {k: v for k, v in node.kwargs.items() if not isinstance(v, fx.Node)}
    weight = weight if isinstance(weight, torch.Tensor) else None
    bias = bias if isinstance(bias, torch.Tensor) else None
    return OpInfo(kind, op, node, m, inputs, {**params, **extra}, weight, bias, **plainness)


def _describe_module(node: fx.Node, m: nn.Module) -> OpInfo:
    rule = module_rule(m)
    if rule is not None:
        kind, op, params = rule(m)
        return _module_info(node, m, kind, op, params, getattr(m, "weight", None), getattr(m, "bias", None))
    for cls, family in TORCH_MODULES:
        if isinstance(m, cls):
            kind, op, params, weight, bias = family(m)
            reason = not_plain(m, cls)
            if reason is not None:  # never described as the class it does not compute
                return _module_info(node, m, Kind.UNKNOWN, type(m).__name__, {},
                                    not_plain=NotPlain(kind, op, reason))
            return _module_info(node, m, kind, op, params, weight, bias)
    return _module_info(node, m, Kind.UNKNOWN, type(m).__name__, {})


def _with_effects(info: OpInfo, known: bool) -> OpInfo:
    return dataclasses.replace(info, effects=effects_of(info, known))


_CHANNEL_DIM = {Kind.CONV: 1, Kind.LINEAR: -1, Kind.EMBEDDING: -1, Kind.POOL: 1, Kind.ATTENTION: -1}


def describe(node: fx.Node, gm: fx.GraphModule) -> OpInfo:
    """What ``node`` of ``gm`` means (never raises for unknown targets: ``Kind.UNKNOWN``)."""
    if node.op == "placeholder":
        return OpInfo(Kind.PLACEHOLDER, "placeholder", node)
    if node.op == "output":
        return OpInfo(Kind.OUTPUT, "output", node, inputs=tuple(node.args))
    if node.op == "get_attr":
        return OpInfo(Kind.CONSTANT, "get_attr", node, weight=attr_tensor(gm, node))
    if node.op == "call_module":
        try:
            module = gm.get_submodule(str(node.target))
        except AttributeError:
            return _with_effects(OpInfo(Kind.UNKNOWN, str(node.target), node, inputs=tuple(node.args)), False)
        return _with_effects(_describe_module(node, module), False)
    entry = function_entry(node.target) if node.op == "call_function" else method_entry(str(node.target))
    if entry is None:
        name = getattr(node.target, "__name__", str(node.target))
        return _with_effects(OpInfo(Kind.UNKNOWN, name, node, inputs=tuple(node.args)), False)
    kind, op, data_names, names = entry
    if op == "einsum":
        operands = node.args[1:]
        if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
            operands = tuple(operands[0])
        return _with_effects(OpInfo(kind, op, node, inputs=tuple(operands), params={"equation": node.args[0]}),
                             True)
    data, params = _bind(node, data_names, names)
    if kind is Kind.CONCAT and data:
        data = tuple(data[0])  # cat/stack take one sequence of tensors
    defaults = _signature_defaults(node.target) if node.op == "call_function" else {}
    for key, value in PARAM_DEFAULTS.get(op, {}).items():
        params.setdefault(key, defaults.get(key, value))  # the function's own default, where it has one
    if op == "pad" and not _spatial_pad(data, params):
        return _with_effects(OpInfo(Kind.UNKNOWN, op, node, inputs=tuple(node.args)), True)
    if kind is Kind.CONV:
        params["transposed"] = op.startswith("conv_transpose")
        params["spatial_dims"] = int(op[-2])
        params.setdefault("groups", 1)
    if kind in _CHANNEL_DIM or kind is Kind.NORM:
        params["channel_dim"] = -1 if op == "layer_norm" else _CHANNEL_DIM.get(kind, 1)
    w, b = params.get("weight"), params.get("bias")
    info = OpInfo(kind, op, node, None, data, params, attr_tensor(gm, w), attr_tensor(gm, b),
                  w if isinstance(w, fx.Node) else None, b if isinstance(b, fx.Node) else None)
    return _with_effects(info, True)


# A call_module node with no arguments, for describing a module outside any graph.
_PROBE = fx.Graph().call_module("module", ())


def describe_module(module: nn.Module) -> OpInfo:
    """What ``module`` computes, as :func:`describe` says of a node calling it (``inputs`` empty,
    ``node`` a stand-in): for the passes that hold a module, not a node (a layer wrapper's inner
    module, the layers inside a module kept whole)."""
    return _with_effects(_describe_module(_PROBE, module), False)


def _spatial_pad(data: tuple, params: dict[str, Any]) -> bool:
    """Whether an ``F.pad`` pads only the dims after the channels (of a batched input)."""
    shape = tensor_shape(data[0]) if data else None
    pad = params.get("pad")
    return shape is not None and isinstance(pad, (tuple, list)) and len(pad) % 2 == 0 \
        and len(pad) // 2 <= len(shape) - 2


def meta_shape(meta: Any) -> tuple[int, ...] | None:
    """The shape in a ``tensor_meta`` entry, or None for non-tensors (a tuple of entries, None)."""
    return tuple(meta.shape) if hasattr(meta, "shape") and hasattr(meta, "dtype") else None


def tensor_shape(node: Any) -> tuple[int, ...] | None:
    """The shape recorded on a node by capture (``tensor_meta``), or None for non-tensors."""
    return meta_shape(node.meta.get("tensor_meta")) if isinstance(node, fx.Node) else None


#: The kinds of layers with weights that multiply activations.
WEIGHTED_KINDS = frozenset({Kind.CONV, Kind.LINEAR, Kind.BILINEAR, Kind.ATTENTION, Kind.RECURRENT})


def layers_inside(module: nn.Module, kinds: Iterable[Kind] = WEIGHTED_KINDS) -> list[str]:
    """Paths (relative to ``module``) of the conv, linear, attention and recurrent layers inside it
    (or of the layers of the given ``kinds``), plain or not.

    For a module the graph calls as one node without describing it (a leaf
    kept whole, such as ``nn.TransformerEncoder``, which symbolic tracing
    cannot enter), these layers are out of every pass's reach: reports say so
    instead of counting them as nothing.
    """
    wanted = set(kinds)
    found: list[str] = []
    for name, m in module.named_modules():
        if not name or any(name.startswith(f"{outer}.") for outer in found):
            continue  # a layer inside a layer (attention's out_proj) is part of it, not one more
        info = describe_module(m)
        if info.family in wanted:
            found.append(name)
    return found
