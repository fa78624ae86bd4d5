"""Effects: what an op does besides computing its result (:class:`~fxcompress.ops.Effects`).

Which arguments it writes in place, whether it draws random numbers, whether its
result may share memory with an input, whether it is declared impure.  Read by
dead-node elimination (what may go, what is a no-op), by the lowering (what may be
deferred) and by anything else that moves or drops nodes.  Conservative where it
cannot know: an op whose semantics are unknown may alias its inputs; an in-place
method or function is recognised by torch's naming convention (``add_``,
``operator.iadd``, ``inplace=True``) or, for ATen operators, by their schema.
"""

from __future__ import annotations

import functools
import inspect
import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from .info import PURE, Effects, Kind, OpInfo

__all__ = ["effects_of", "call_arguments"]

_INPLACE_OPERATORS = {
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
    operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
    operator.imatmul, operator.setitem,
}
_INPLACE_DUNDERS = {f"__{op.__name__}__" for op in _INPLACE_OPERATORS}
_RANDOM_METHODS = {"bernoulli", "multinomial"}
_RANDOM_FUNCTIONS = {
    torch.rand, torch.rand_like, torch.randn, torch.randn_like, torch.randint, torch.randint_like,
    torch.randperm, torch.bernoulli, torch.multinomial, torch.normal, torch.poisson,
    F.gumbel_softmax, F.fractional_max_pool2d, F.fractional_max_pool3d,
}
# Random only with training=True (their "training" argument defaults to False).
_RANDOM_WHEN_TRAINING = {F.rrelu, torch.rrelu}
_RANDOM_MODULES = (nn.FractionalMaxPool2d, nn.FractionalMaxPool3d)
_RANDOM_IN_TRAINING_MODULES = (nn.modules.dropout._DropoutNd, nn.RReLU)
# Ops that always return a new tensor; anything else (views, reshape, getitem,
# unknown ops) is assumed to possibly return an alias of its inputs.
_FRESH_KINDS = {Kind.CONV, Kind.LINEAR, Kind.BILINEAR, Kind.RECURRENT, Kind.NORM, Kind.ELEMENTWISE,
                Kind.ACTIVATION, Kind.SOFTMAX, Kind.POOL, Kind.CONCAT, Kind.MATMUL, Kind.EMBEDDING, Kind.ATTENTION,
                Kind.REDUCTION}
_ALIASING_OPS = {"stochastic_depth", "einsum"}  # return their input / a view in some cases
_STOCHASTIC_OPS = ("dropout", "stochastic_depth")  # random when training


@functools.lru_cache(maxsize=None)
def _signature(target: Callable) -> inspect.Signature | None:
    try:
        return inspect.signature(target)
    except (TypeError, ValueError):  # builtins without a Python signature
        return None


def call_arguments(node: fx.Node) -> dict[str, Any]:
    """A ``call_function`` node's arguments by parameter name, defaults included (its kwargs
    alone when the function has no Python signature or the call does not bind to it)."""
    sig = _signature(node.target) if node.op == "call_function" else None
    if sig is None:
        return dict(node.kwargs)
    try:
        bound = sig.bind(*node.args, **node.kwargs)
    except TypeError:
        return dict(node.kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _inplace_name(name: str) -> bool:
    return (name.endswith("_") and not name.startswith("_")) or name in _INPLACE_DUNDERS


def _mutated(info: OpInfo, known: bool) -> tuple[int, ...]:
    """The positions of the node arguments the op writes into."""
    node, indices = info.node, []
    if node.op == "call_method" and _inplace_name(str(node.target)):
        indices = [0]
    elif node.op == "call_function":
        schema = getattr(node.target, "_schema", None)
        if schema is not None:  # an aten op: the schema says which arguments it writes
            indices = [i for i, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write]
        elif node.target in _INPLACE_OPERATORS or _inplace_name(getattr(node.target, "__name__", "")) \
                or (info.params.get("inplace") if known else call_arguments(node).get("inplace")) is True:
            indices = [0]
    elif node.op == "call_module" and info.module is not None:
        indices = list(getattr(info.module, "mutates_args", ()))
        if getattr(info.module, "inplace", False) is True:
            indices.append(0)
    return tuple(i for i in indices if i < len(node.args) and isinstance(node.args[i], fx.Node))


def _random(info: OpInfo) -> bool:
    node, module = info.node, info.module
    if node.op == "call_module":
        if module is None:
            return False
        return isinstance(module, _RANDOM_MODULES) or \
            bool(module.training) and isinstance(module, _RANDOM_IN_TRAINING_MODULES)
    if node.op == "call_method":
        return str(node.target) in _RANDOM_METHODS
    if node.target in _RANDOM_FUNCTIONS:
        return True
    if info.op in _STOCHASTIC_OPS:
        return info.params.get("training") is True
    return node.target in _RANDOM_WHEN_TRAINING and call_arguments(node).get("training") is True


def effects_of(info: OpInfo, known: bool) -> Effects:
    """The effects of the op ``info`` describes (``known``: its target is in the tables, so
    ``info.params`` holds its arguments by name)."""
    node = info.node
    if node.op not in ("call_module", "call_function", "call_method"):
        return PURE
    try:
        hashable_target = node.op != "call_function" or hash(node.target) is not None
    except TypeError:  # an unhashable callable: nothing in the tables, nothing known
        hashable_target = False
    mutates = _mutated(info, known) if hashable_target else ()
    marker: Any = info.module if node.op == "call_module" else node.target
    declared = getattr(marker, "fxc_impure", False) is True or bool(getattr(info.module, "mutates_args", ()))
    if node.op == "call_function":
        side_effect = node.is_impure()
    else:
        side_effect = node.op == "call_module" and bool(getattr(info.module, "_is_impure", False))
    if info.kind is Kind.IDENTITY:
        aliases = info.op != "clone"
    else:
        aliases = info.kind not in _FRESH_KINDS or info.op in _ALIASING_OPS
    return Effects(mutates=mutates, random=hashable_target and _random(info), may_alias=bool(mutates) or aliases,
                   declared_impure=declared, side_effect=side_effect)
