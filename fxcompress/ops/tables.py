"""The tables behind :func:`fxcompress.ops.describe`: torch modules, functions and methods by family.

A front end that records other targets (``torch.export``'s ATen operators, a library's
wrapped functions) teaches describe them here, through :func:`register_function`,
:func:`register_method`, :func:`register_module` and :func:`register_qualified`; the
passes then know them without a change.  What an op does to memory and randomness is
in :mod:`fxcompress.ops.effects`.
"""

from __future__ import annotations

import builtins
import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .info import Kind

__all__ = ["ModuleRule", "register_module", "register_function", "register_method", "register_qualified",
           "ACTIVATION_PARAMS", "TORCH_MODULES", "function_entry", "method_entry", "module_rule", "PARAM_DEFAULTS",
           "Entry", "FIRST_DATA_ALIASES"]

#: ``rule(module) -> (kind, op, params)``: what a module of a registered class computes.
ModuleRule = Callable[[nn.Module], tuple[Kind, str, dict]]
# What a torch module family's rule gives: (kind, op, params, weight, bias).
_Family = Callable[[nn.Module], tuple[Kind, str, dict, Any, Any]]

# -- modules -------------------------------------------------------------------
_MODULE_RULES: dict[type, ModuleRule] = {}


def register_module(cls: type, rule: ModuleRule) -> None:
    """Teach :func:`describe` a module type: ``rule(module) -> (kind, op, params)``.

    Registered rules are consulted before the built-in tables (subclasses
    included), so a runtime module can declare what it computes.
    """
    _MODULE_RULES[cls] = rule


def module_rule(module: nn.Module) -> ModuleRule | None:
    """The registered rule of ``module``'s class (or of a class it derives from), if any."""
    return next((rule for cls, rule in _MODULE_RULES.items() if isinstance(module, cls)), None)


# Each activation's parameters after the input (module attributes of the same names).
ACTIVATION_PARAMS: dict[str, tuple[str, ...]] = {
    "relu": ("inplace",), "relu6": ("inplace",), "gelu": ("approximate",), "silu": ("inplace",),
    "hardswish": ("inplace",), "hardsigmoid": ("inplace",), "sigmoid": (), "tanh": (), "mish": ("inplace",),
    "leaky_relu": ("negative_slope", "inplace"), "elu": ("alpha", "inplace"), "selu": ("inplace",),
    "celu": ("alpha", "inplace"), "softplus": ("beta", "threshold"), "hardtanh": ("min_val", "max_val", "inplace"),
    "prelu": ("weight",), "logsigmoid": (),
}
_POOL_ATTRS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "output_size")


def _conv(dims: int, transposed: bool) -> _Family:
    def rule(m: nn.Module) -> tuple[Kind, str, dict, Any, Any]:
        params = {"groups": m.groups, "transposed": transposed, "stride": m.stride, "padding": m.padding,
                  "dilation": m.dilation, "kernel_size": m.kernel_size, "spatial_dims": dims, "channel_dim": 1}
        if transposed:
            params["output_padding"] = m.output_padding
        return Kind.CONV, f"conv_transpose{dims}d" if transposed else f"conv{dims}d", params, m.weight, m.bias
    return rule


def _norm(op: str) -> _Family:
    def rule(m: nn.Module) -> tuple[Kind, str, dict, Any, Any]:
        params: dict[str, Any] = {"channel_dim": -1 if op == "layer_norm" else 1, "eps": getattr(m, "eps", None)}
        if op == "group_norm":
            params["num_groups"] = m.num_groups
        if op == "layer_norm":
            params["normalized_shape"] = m.normalized_shape
        return Kind.NORM, op, params, getattr(m, "weight", None), getattr(m, "bias", None)
    return rule


def _activation(op: str) -> _Family:
    def rule(m: nn.Module) -> tuple[Kind, str, dict, Any, Any]:
        params = {k: getattr(m, k) for k in ACTIVATION_PARAMS.get(op, ()) if k != "weight" and hasattr(m, k)}
        return Kind.ACTIVATION, op, params, getattr(m, "weight", None), None
    return rule


def _pool(op: str) -> _Family:
    def rule(m: nn.Module) -> tuple[Kind, str, dict, Any, Any]:
        params = {k: getattr(m, k) for k in _POOL_ATTRS if hasattr(m, k)}
        return Kind.POOL, op, {**params, "channel_dim": 1}, None, None
    return rule


def _pad(mode: str) -> _Family:
    def rule(m: nn.Module) -> tuple[Kind, str, dict, Any, Any]:
        value = float(getattr(m, "value", 0.0)) if mode == "constant" else None
        return Kind.POOL, "pad", {"pad": tuple(m.padding), "mode": mode, "value": value, "channel_dim": 1}, None, None
    return rule


def _dropout(m: nn.Module) -> tuple[Kind, str, dict, Any, Any]:
    return Kind.IDENTITY, "dropout", {"training": m.training, "p": m.p}, None, None


def _recurrent(m: nn.Module) -> tuple[Kind, str, dict, Any, Any]:
    return Kind.RECURRENT, m.mode.lower(), {"hidden_size": m.hidden_size, "num_layers": m.num_layers,
                                            "batch_first": m.batch_first, "bidirectional": m.bidirectional}, None, None


def _fixed(kind: Kind, op: str, params: Callable[[nn.Module], dict] = lambda m: {},
           weight: str | None = None, bias: str | None = None) -> _Family:
    def rule(m: nn.Module) -> tuple[Kind, str, dict, Any, Any]:
        return (kind, op, params(m), getattr(m, weight) if weight else None, getattr(m, bias) if bias else None)
    return rule


_TORCH: list[tuple[type, _Family]] = []
for _d in (1, 2, 3):
    _TORCH += [(getattr(nn, f"Conv{_d}d"), _conv(_d, False)), (getattr(nn, f"ConvTranspose{_d}d"), _conv(_d, True))]
_TORCH.append((nn.Linear, _fixed(Kind.LINEAR, "linear", lambda m: {"channel_dim": -1}, "weight", "bias")))
_TORCH.append((nn.Bilinear, _fixed(Kind.BILINEAR, "bilinear", lambda m: {"channel_dim": -1}, "weight", "bias")))
for _cls, _op in {
    nn.BatchNorm1d: "batch_norm", nn.BatchNorm2d: "batch_norm", nn.BatchNorm3d: "batch_norm",
    nn.SyncBatchNorm: "batch_norm", nn.GroupNorm: "group_norm", nn.LayerNorm: "layer_norm",
    nn.InstanceNorm1d: "instance_norm", nn.InstanceNorm2d: "instance_norm",
    nn.InstanceNorm3d: "instance_norm", nn.LocalResponseNorm: "local_response_norm",
}.items():
    _TORCH.append((_cls, _norm(_op)))
for _cls, _op in {
    nn.ReLU: "relu", nn.ReLU6: "relu6", nn.LeakyReLU: "leaky_relu", nn.PReLU: "prelu",
    nn.ELU: "elu", nn.SELU: "selu", nn.CELU: "celu", nn.GELU: "gelu", nn.SiLU: "silu",
    nn.Hardswish: "hardswish", nn.Hardsigmoid: "hardsigmoid", nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh", nn.Mish: "mish", nn.Softplus: "softplus", nn.Hardtanh: "hardtanh",
    nn.LogSigmoid: "logsigmoid",
}.items():
    _TORCH.append((_cls, _activation(_op)))
_TORCH.append((nn.Softmax, _fixed(Kind.SOFTMAX, "softmax", lambda m: {"dim": m.dim})))
_TORCH.append((nn.LogSoftmax, _fixed(Kind.SOFTMAX, "log_softmax", lambda m: {"dim": m.dim})))
for _d in (1, 2, 3):
    for _cls_name, _op in (("MaxPool", "max_pool"), ("AvgPool", "avg_pool"),
                           ("AdaptiveAvgPool", "adaptive_avg_pool"), ("AdaptiveMaxPool", "adaptive_max_pool")):
        _TORCH.append((getattr(nn, f"{_cls_name}{_d}d"), _pool(f"{_op}{_d}d")))
# Padding modules (they pad spatial dims only: 2 values per padded dim), by mode.
for _d in (1, 2, 3):
    for _cls_name, _mode in (("ConstantPad", "constant"), ("ReflectionPad", "reflect"),
                             ("ReplicationPad", "replicate"), ("CircularPad", "circular")):
        if hasattr(nn, f"{_cls_name}{_d}d"):
            _TORCH.append((getattr(nn, f"{_cls_name}{_d}d"), _pad(_mode)))  # ZeroPad*d subclass ConstantPad*d
_TORCH.append((nn.Upsample, _fixed(Kind.POOL, "interpolate", lambda m: {
    "size": m.size, "scale_factor": m.scale_factor, "mode": m.mode, "align_corners": m.align_corners,
    "channel_dim": 1})))
_TORCH.append((nn.Identity, _fixed(Kind.IDENTITY, "identity")))
for _cls in (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout):
    _TORCH.append((_cls, _dropout))
_TORCH.append((nn.Flatten, _fixed(Kind.RESHAPE, "flatten", lambda m: {"start_dim": m.start_dim,
                                                                     "end_dim": m.end_dim})))
_TORCH.append((nn.Unflatten, _fixed(Kind.RESHAPE, "unflatten", lambda m: {"dim": m.dim,
                                                                         "sizes": m.unflattened_size})))
_TORCH.append((nn.Embedding, _fixed(Kind.EMBEDDING, "embedding", lambda m: {"channel_dim": -1,
                                                                           "padding_idx": m.padding_idx}, "weight")))
_TORCH.append((nn.MultiheadAttention, _fixed(Kind.ATTENTION, "multihead_attention", lambda m: {
    "num_heads": m.num_heads, "embed_dim": m.embed_dim, "batch_first": m.batch_first, "channel_dim": -1},
    "in_proj_weight", "in_proj_bias")))
for _cls in (nn.RNN, nn.LSTM, nn.GRU):
    _TORCH.append((_cls, _recurrent))

#: The torch module classes describe knows, in the order it tries them (a class before its
#: subclasses' other families), each with its rule ``-> (kind, op, params, weight, bias)``.
TORCH_MODULES: tuple[tuple[type, _Family], ...] = tuple(_TORCH)


# -- function and method tables ------------------------------------------------
# target -> (kind, canonical op, data input names, parameter names after the data inputs).
# A parameter name starting with "*" collects the remaining positional arguments.
Entry = tuple[Kind, str, tuple[str, ...], tuple[str, ...]]
_FUNCTIONS: dict[Callable, Entry] = {}
_METHODS: dict[str, Entry] = {}
_DEFAULT_DATA = {Kind.ELEMENTWISE: ("input", "other"), Kind.MATMUL: ("input", "other")}
FIRST_DATA_ALIASES = ("input", "self", "tensor", "a")


def _entry(kind: Kind, op: str, names: tuple[str, ...], data: tuple[str, ...] | None) -> Entry:
    return kind, op, tuple(data or _DEFAULT_DATA.get(kind, ("input",))), tuple(names)


def register_function(fn: Callable, kind: Kind, op: str, arg_names: tuple[str, ...], *,
                      data: tuple[str, ...] | None = None) -> None:
    """Teach :func:`describe` a function target (e.g. a library function kept whole by ``autowrap``).

    ``data`` names the leading data inputs (default: one, or two for
    elementwise and matmul kinds); ``arg_names`` name the arguments after them.
    """
    _FUNCTIONS[fn] = _entry(kind, op, arg_names, data)


def register_method(name: str, kind: Kind, op: str, arg_names: tuple[str, ...], *,
                    data: tuple[str, ...] | None = None) -> None:
    """Teach :func:`describe` a tensor method (``x.name(...)``); ``self`` is the first data input."""
    _METHODS[name] = _entry(kind, op, arg_names, data)


def _fn(kind: Kind, op: str, names: tuple[str, ...], *targets: Callable, data: tuple[str, ...] | None = None) -> None:
    for t in targets:
        register_function(t, kind, op, names, data=data)


def _method(kind: Kind, op: str, names: tuple[str, ...], *methods: str, data: tuple[str, ...] | None = None) -> None:
    for m in methods:
        if hasattr(torch.Tensor, m):  # the loops below propose x.name_ forms not every op has
            register_method(m, kind, op, names, data=data)


_CONV_ARGS = ("weight", "bias", "stride", "padding", "dilation", "groups")
_CONVT_ARGS = ("weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
for _d in (1, 2, 3):
    _fn(Kind.CONV, f"conv{_d}d", _CONV_ARGS, getattr(F, f"conv{_d}d"), getattr(torch, f"conv{_d}d"))
    _fn(Kind.CONV, f"conv_transpose{_d}d", _CONVT_ARGS, getattr(F, f"conv_transpose{_d}d"))
    _fn(Kind.POOL, f"max_pool{_d}d", ("kernel_size", "stride", "padding", "dilation", "ceil_mode",
                                      "return_indices"), getattr(F, f"max_pool{_d}d"))
    _fn(Kind.POOL, f"avg_pool{_d}d", ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                                      "divisor_override"), getattr(F, f"avg_pool{_d}d"))
    _fn(Kind.POOL, f"adaptive_avg_pool{_d}d", ("output_size",), getattr(F, f"adaptive_avg_pool{_d}d"))
    _fn(Kind.POOL, f"adaptive_max_pool{_d}d", ("output_size", "return_indices"),
        getattr(F, f"adaptive_max_pool{_d}d"))
_fn(Kind.POOL, "interpolate", ("size", "scale_factor", "mode", "align_corners"), F.interpolate)
_fn(Kind.POOL, "pad", ("pad", "mode", "value"), F.pad)
_fn(Kind.LINEAR, "linear", ("weight", "bias"), F.linear)
_fn(Kind.NORM, "batch_norm", ("running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
    F.batch_norm)
_fn(Kind.NORM, "layer_norm", ("normalized_shape", "weight", "bias", "eps"), F.layer_norm)
_fn(Kind.NORM, "group_norm", ("num_groups", "weight", "bias", "eps"), F.group_norm)
_fn(Kind.NORM, "instance_norm", ("running_mean", "running_var", "weight", "bias", "use_input_stats",
                                 "momentum", "eps"), F.instance_norm)
for _name, _targets in {
    "add": (operator.add, operator.iadd, torch.add), "sub": (operator.sub, operator.isub, torch.sub),
    "mul": (operator.mul, operator.imul, torch.mul), "div": (operator.truediv, operator.itruediv, torch.div),
    "floordiv": (operator.floordiv,), "pow": (operator.pow, torch.pow),
    "maximum": (torch.maximum,), "minimum": (torch.minimum,),
    "eq": (operator.eq, torch.eq), "ne": (operator.ne, torch.ne), "lt": (operator.lt, torch.lt),
    "le": (operator.le, torch.le), "gt": (operator.gt, torch.gt), "ge": (operator.ge, torch.ge),
}.items():
    _fn(Kind.ELEMENTWISE, _name, ("alpha",) if _name in ("add", "sub") else (), *_targets)
    _method(Kind.ELEMENTWISE, _name, ("alpha",) if _name in ("add", "sub") else (),
            _name, f"{_name}_", f"__{_name}__")
_method(Kind.ELEMENTWISE, "div", (), "true_divide", "__truediv__")
for _name, _names in ACTIVATION_PARAMS.items():
    _fn(Kind.ACTIVATION, _name, _names, *[getattr(m, _name) for m in (F, torch) if hasattr(m, _name)])
    _method(Kind.ACTIVATION, _name, (), _name, f"{_name}_")
_fn(Kind.ACTIVATION, "neg", (), operator.neg, torch.neg)
_fn(Kind.ACTIVATION, "exp", (), torch.exp)
_fn(Kind.ACTIVATION, "sqrt", (), torch.sqrt)
_fn(Kind.ACTIVATION, "abs", (), torch.abs, operator.abs)
_method(Kind.ACTIVATION, "neg", (), "neg", "__neg__")
_method(Kind.ACTIVATION, "exp", (), "exp")
_method(Kind.ACTIVATION, "sqrt", (), "sqrt")
_method(Kind.ACTIVATION, "abs", (), "abs")
_method(Kind.ACTIVATION, "clamp", ("min", "max"), "clamp", "clamp_", "clip")
_fn(Kind.ACTIVATION, "clamp", ("min", "max"), torch.clamp, torch.clip)
_fn(Kind.SOFTMAX, "softmax", ("dim",), F.softmax, torch.softmax)
_fn(Kind.SOFTMAX, "log_softmax", ("dim",), F.log_softmax, torch.log_softmax)
_method(Kind.SOFTMAX, "softmax", ("dim",), "softmax")
_method(Kind.SOFTMAX, "log_softmax", ("dim",), "log_softmax")
_fn(Kind.RESHAPE, "flatten", ("start_dim", "end_dim"), torch.flatten)
_fn(Kind.RESHAPE, "reshape", ("shape",), torch.reshape)
_fn(Kind.RESHAPE, "squeeze", ("dim",), torch.squeeze)
_fn(Kind.RESHAPE, "unsqueeze", ("dim",), torch.unsqueeze)
_method(Kind.RESHAPE, "flatten", ("start_dim", "end_dim"), "flatten")
_method(Kind.RESHAPE, "view", ("*shape",), "view")
_method(Kind.RESHAPE, "reshape", ("*shape",), "reshape")
_method(Kind.RESHAPE, "squeeze", ("dim",), "squeeze")
_method(Kind.RESHAPE, "unsqueeze", ("dim",), "unsqueeze")
_method(Kind.RESHAPE, "unflatten", ("dim", "sizes"), "unflatten")
_method(Kind.RESHAPE, "expand", ("*sizes",), "expand")
_fn(Kind.PERMUTE, "permute", ("dims",), torch.permute)
_fn(Kind.PERMUTE, "transpose", ("dim0", "dim1"), torch.transpose, torch.swapaxes, torch.swapdims)
_method(Kind.PERMUTE, "permute", ("*dims",), "permute")
_method(Kind.PERMUTE, "transpose", ("dim0", "dim1"), "transpose", "swapaxes", "swapdims")
_fn(Kind.CONCAT, "cat", ("dim",), torch.cat, torch.concat, data=("tensors",))
_fn(Kind.CONCAT, "stack", ("dim",), torch.stack, data=("tensors",))
_fn(Kind.SPLIT, "split", ("split_size_or_sections", "dim"), torch.split)
_fn(Kind.SPLIT, "chunk", ("chunks", "dim"), torch.chunk)
_fn(Kind.SPLIT, "unbind", ("dim",), torch.unbind)
_method(Kind.SPLIT, "split", ("split_size", "dim"), "split")
_method(Kind.SPLIT, "chunk", ("chunks", "dim"), "chunk")
_method(Kind.SPLIT, "unbind", ("dim",), "unbind")
_fn(Kind.GETITEM, "getitem", ("index",), operator.getitem)
_fn(Kind.MATMUL, "matmul", (), torch.matmul, operator.matmul)
_fn(Kind.MATMUL, "bmm", (), torch.bmm)
_fn(Kind.MATMUL, "mm", (), torch.mm)
_fn(Kind.MATMUL, "addmm", ("beta", "alpha"), torch.addmm, data=("input", "mat1", "mat2"))
_fn(Kind.MATMUL, "baddbmm", ("beta", "alpha"), torch.baddbmm, data=("input", "batch1", "batch2"))
_method(Kind.MATMUL, "matmul", (), "matmul", "__matmul__")
_method(Kind.MATMUL, "bmm", (), "bmm")
_method(Kind.MATMUL, "mm", (), "mm")
_fn(Kind.MATMUL, "einsum", (), torch.einsum)  # described specially: (equation, *operands)
_fn(Kind.BILINEAR, "bilinear", ("weight", "bias"), F.bilinear, data=("input1", "input2"))
_fn(Kind.EMBEDDING, "embedding", ("weight", "padding_idx"), F.embedding)
_fn(Kind.ATTENTION, "scaled_dot_product_attention", ("attn_mask", "dropout_p", "is_causal", "scale"),
    F.scaled_dot_product_attention, data=("query", "key", "value"))
for _name in ("mean", "sum", "amax", "amin", "std", "var"):
    _fn(Kind.REDUCTION, _name, ("dim", "keepdim"), getattr(torch, _name))
    _method(Kind.REDUCTION, _name, ("dim", "keepdim"), _name)
_fn(Kind.IDENTITY, "dropout", ("p", "training", "inplace"), F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    F.alpha_dropout, F.feature_alpha_dropout)
_method(Kind.IDENTITY, "contiguous", (), "contiguous")
_method(Kind.IDENTITY, "clone", (), "clone")
_fn(Kind.IDENTITY, "clone", (), torch.clone)
_fn(Kind.SHAPE, "getattr", ("name",), builtins.getattr)
_method(Kind.SHAPE, "size", ("dim",), "size")
_method(Kind.SHAPE, "dim", (), "dim")
_fn(Kind.ASSERT, "assert", ("message",), torch._assert)
# What symbolic tracing inserts for an argument fixed to None (concrete_args, or left out).
_fn(Kind.ASSERT, "assert_is_none", ("message",), torch.fx._symbolic_trace._assert_is_none)


# Library functions that tracing keeps whole (``torch.fx.wrap``), by qualified name, so that
# describing a graph never imports the library (importing torchvision costs seconds).
_QUALIFIED: dict[str, Entry] = {
    "torchvision.ops.stochastic_depth.stochastic_depth":
        _entry(Kind.IDENTITY, "stochastic_depth", ("p", "mode", "training"), None),
    "torchvision.models.swin_transformer.shifted_window_attention":
        _entry(Kind.ATTENTION, "shifted_window_attention",
               ("qkv_weight", "proj_weight", "relative_position_bias", "window_size", "num_heads", "shift_size",
                "attention_dropout", "dropout", "qkv_bias", "proj_bias", "logit_scale", "training"), None),
    # Deliberately UNKNOWN: their channel semantics (padding a channels-last map, gathering a
    # bias table per head) are not what any family above promises.
    "torchvision.models.swin_transformer._patch_merging_pad": _entry(Kind.UNKNOWN, "patch_merging_pad", (), None),
    "torchvision.models.swin_transformer._get_relative_position_bias":
        _entry(Kind.UNKNOWN, "get_relative_position_bias", (), None),
}


def register_qualified(name: str, kind: Kind, op: str, arg_names: tuple[str, ...], *,
                       data: tuple[str, ...] | None = None) -> None:
    """Teach :func:`describe` a library function by its qualified name (``"pkg.module.function"``),
    so that describing a graph never imports the library that defines it."""
    _QUALIFIED[name] = _entry(kind, op, arg_names, data)


def function_entry(target: Any) -> Entry | None:
    """What the table says of a ``call_function`` target, or None."""
    try:
        entry = _FUNCTIONS.get(target)
    except TypeError:  # an unhashable callable cannot be in the table
        return None
    if entry is None:
        entry = _QUALIFIED.get(f"{getattr(target, '__module__', '')}.{getattr(target, '__name__', '')}")
    return entry


def method_entry(name: str) -> Entry | None:
    """What the table says of a ``call_method`` name, or None."""
    return _METHODS.get(name)


# Defaults that change meaning when absent: F.dropout and stochastic depth drop unless told not to.
PARAM_DEFAULTS: dict[str, dict[str, Any]] = {
    "dropout": {"training": True}, "stochastic_depth": {"training": True}, "cat": {"dim": 0},
    "stack": {"dim": 0}, "batch_norm": {"training": False}, "pad": {"mode": "constant", "value": 0.0},
}

