"""Op semantics: what a node *means*, in one place.

Passes ask :func:`describe` "is this a conv, and where are its weight, bias,
channel dims and groups?" instead of matching node targets themselves.  The
``call_module``, ``call_function`` and ``call_method`` forms of an op (``nn.Conv2d``,
``F.conv2d``; ``nn.MaxPool2d``, ``F.max_pool2d``; ``torch.add``, ``x + y``,
``x.add(y)``; ``x.view``, ``torch.reshape``) all describe to the same
:class:`OpInfo` kind and canonical ``op`` name, so a new front end (e.g.
``torch.export`` raised to module form) only has to extend the tables below.

Guarantee: :func:`describe` never guesses and never raises.  A target it does
not know gets kind ``Kind.UNKNOWN``; analyses must treat that as "semantics
unknown" (e.g. pruning freezes the channels that flow through it).
"""

from __future__ import annotations

import builtins
import enum
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["Kind", "OpInfo", "describe", "register_function", "register_method", "register_module",
           "tensor_shape", "layers_inside"]


class Kind(str, enum.Enum):
    """Op families; the channel rules of pruning and quantization are per family."""

    PLACEHOLDER = "placeholder"
    OUTPUT = "output"
    CONSTANT = "constant"  # get_attr
    CONV = "conv"
    LINEAR = "linear"
    NORM = "norm"
    ELEMENTWISE = "elementwise"  # binary arithmetic and comparisons, with broadcasting
    ACTIVATION = "activation"  # unary, pointwise
    SOFTMAX = "softmax"
    POOL = "pool"  # per-channel spatial resampling: pooling, interpolation, spatial padding
    RESHAPE = "reshape"  # the same data in another shape: view, reshape, flatten, (un)squeeze, expand
    PERMUTE = "permute"  # dims reordered: permute, transpose, swapaxes
    CONCAT = "concat"
    SPLIT = "split"
    GETITEM = "getitem"
    MATMUL = "matmul"
    EMBEDDING = "embedding"
    ATTENTION = "attention"
    REDUCTION = "reduction"
    # A no-op at inference: identity, contiguous, clone always; dropout and
    # stochastic depth only when ``params["training"]`` is False.
    IDENTITY = "identity"
    SHAPE = "shape"  # size(), dim(), .shape: non-tensor results
    ASSERT = "assert"  # torch._assert: a runtime check with no result; never removed
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class OpInfo:
    """What one node means.

    ``op`` is a canonical name ("conv2d", "add", "max_pool2d", "view", ...).
    ``inputs`` are the data inputs (nodes or constants) in order: for
    ``torch.cat``/``torch.stack`` the tensors joined, for attention
    ``(query, key, value)``.  ``params`` holds the named non-data arguments
    (stride, dim, groups, ...; variadic shapes such as ``x.view(b, -1)``
    packed into one tuple), plus ``channel_dim`` for ops that have channels.
    For weighted ops, ``weight``/``bias`` are the tensors (from the module or a
    ``get_attr``) and ``weight_node``/``bias_node`` the nodes of functional forms.
    """

    kind: Kind
    op: str
    node: fx.Node
    module: nn.Module | None = None
    inputs: tuple = ()
    params: dict[str, Any] = field(default_factory=dict)
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    weight_node: fx.Node | None = None
    bias_node: fx.Node | None = None

    # -- channel geometry of weighted ops ---------------------------------
    @property
    def groups(self) -> int:
        return int(self.params.get("groups", 1))

    @property
    def transposed(self) -> bool:
        return bool(self.params.get("transposed", False))

    @property
    def weight_out_dim(self) -> int:
        """The weight dim indexing output channels (1 for transposed conv)."""
        return 1 if self.transposed else 0

    @property
    def weight_in_dim(self) -> int:
        """The weight dim indexing input channels (per group for conv)."""
        return 0 if self.transposed else 1

    @property
    def channel_dim(self) -> int:
        """The activation dim that holds channels: 1 for conv/norm/pool (NC...), -1 for linear/layer norm."""
        return int(self.params.get("channel_dim", 1))


# -- module tables ------------------------------------------------------------
_CONV_MODULES: dict[type, int] = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_CONVT_MODULES: dict[type, int] = {nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2, nn.ConvTranspose3d: 3}
_NORM_MODULES: dict[type, str] = {
    nn.BatchNorm1d: "batch_norm", nn.BatchNorm2d: "batch_norm", nn.BatchNorm3d: "batch_norm",
    nn.SyncBatchNorm: "batch_norm", nn.GroupNorm: "group_norm", nn.LayerNorm: "layer_norm",
    nn.InstanceNorm1d: "instance_norm", nn.InstanceNorm2d: "instance_norm",
    nn.InstanceNorm3d: "instance_norm", nn.LocalResponseNorm: "local_response_norm",
}
_ACTIVATION_MODULES: dict[type, str] = {
    nn.ReLU: "relu", nn.ReLU6: "relu6", nn.LeakyReLU: "leaky_relu", nn.PReLU: "prelu",
    nn.ELU: "elu", nn.SELU: "selu", nn.CELU: "celu", nn.GELU: "gelu", nn.SiLU: "silu",
    nn.Hardswish: "hardswish", nn.Hardsigmoid: "hardsigmoid", nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh", nn.Mish: "mish", nn.Softplus: "softplus", nn.Hardtanh: "hardtanh",
    nn.LogSigmoid: "logsigmoid",
}
# Each activation's parameters after the input (module attributes of the same names).
_ACTIVATION_PARAMS: dict[str, tuple[str, ...]] = {
    "relu": ("inplace",), "relu6": ("inplace",), "gelu": ("approximate",), "silu": ("inplace",),
    "hardswish": ("inplace",), "hardsigmoid": ("inplace",), "sigmoid": (), "tanh": (), "mish": ("inplace",),
    "leaky_relu": ("negative_slope", "inplace"), "elu": ("alpha", "inplace"), "selu": ("inplace",),
    "celu": ("alpha", "inplace"), "softplus": ("beta", "threshold"), "hardtanh": ("min_val", "max_val", "inplace"),
    "prelu": ("weight",), "logsigmoid": (),
}
_POOL_MODULES: dict[type, str] = {}
for _d in (1, 2, 3):
    for _cls, _op in (("MaxPool", "max_pool"), ("AvgPool", "avg_pool"),
                      ("AdaptiveAvgPool", "adaptive_avg_pool"), ("AdaptiveMaxPool", "adaptive_max_pool")):
        _POOL_MODULES[getattr(nn, f"{_cls}{_d}d")] = f"{_op}{_d}d"
_POOL_ATTRS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "output_size")
# Padding modules (they pad spatial dims only: 2 values per padded dim), by mode.
_PAD_MODULES: dict[type, str] = {}
for _d in (1, 2, 3):
    for _cls, _mode in (("ConstantPad", "constant"), ("ReflectionPad", "reflect"), ("ReplicationPad", "replicate"),
                        ("CircularPad", "circular")):
        if hasattr(nn, f"{_cls}{_d}d"):
            _PAD_MODULES[getattr(nn, f"{_cls}{_d}d")] = _mode  # ZeroPad*d subclass ConstantPad*d
_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)

_MODULE_RULES: dict[type, Callable[[nn.Module], tuple[Kind, str, dict]]] = {}


def register_module(cls: type, rule: Callable[[nn.Module], tuple[Kind, str, dict]]) -> None:
    """Teach :func:`describe` a module type: ``rule(module) -> (kind, op, params)``.

    Registered rules are consulted before the built-in tables (subclasses
    included), so a runtime module can declare what it computes.
    """
    _MODULE_RULES[cls] = rule


# -- function and method tables ------------------------------------------------
# target -> (kind, canonical op, data input names, parameter names after the data inputs).
# A parameter name starting with "*" collects the remaining positional arguments.
_Entry = tuple[Kind, str, tuple[str, ...], tuple[str, ...]]
_FUNCTIONS: dict[Callable, _Entry] = {}
_METHODS: dict[str, _Entry] = {}
_DEFAULT_DATA = {Kind.ELEMENTWISE: ("input", "other"), Kind.MATMUL: ("input", "other")}
_FIRST_DATA_ALIASES = ("input", "self", "tensor", "a")


def _entry(kind: Kind, op: str, names: tuple[str, ...], data: tuple[str, ...] | None) -> _Entry:
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
for _name, _names in _ACTIVATION_PARAMS.items():
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
_fn(Kind.EMBEDDING, "embedding", ("weight", "padding_idx"), F.embedding)
_fn(Kind.ATTENTION, "scaled_dot_product_attention", ("attn_mask", "dropout_p", "is_causal", "scale"),
    F.scaled_dot_product_attention, data=("query", "key", "value"))
for _name in ("mean", "sum", "amax", "amin", "std", "var"):
    _fn(Kind.REDUCTION, _name, ("dim", "keepdim"), getattr(torch, _name))
    _method(Kind.REDUCTION, _name, ("dim", "keepdim"), _name)
_fn(Kind.IDENTITY, "dropout", ("p", "training", "inplace"), F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    F.alpha_dropout)
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
_QUALIFIED: dict[str, _Entry] = {
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


def _function_entry(target: Any) -> _Entry | None:
    try:
        entry = _FUNCTIONS.get(target)
    except TypeError:  # an unhashable callable cannot be in the table
        return None
    if entry is None:
        entry = _QUALIFIED.get(f"{getattr(target, '__module__', '')}.{getattr(target, '__name__', '')}")
    return entry


# Defaults that change meaning when absent: F.dropout and stochastic depth drop unless told not to.
_PARAM_DEFAULTS: dict[str, dict[str, Any]] = {
    "dropout": {"training": True}, "stochastic_depth": {"training": True}, "cat": {"dim": 0},
    "stack": {"dim": 0}, "batch_norm": {"training": False}, "pad": {"mode": "constant", "value": 0.0},
}


# -- describe ------------------------------------------------------------------
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
        slot = data_names.index(key) if key in data_names else (0 if key in _FIRST_DATA_ALIASES else None)
        if slot is not None:
            data += [None] * (slot + 1 - len(data))
            data[slot] = value
        else:
            params[key.lstrip("*")] = value
    return tuple(data), params


def _attr_tensor(gm: fx.GraphModule, value: Any) -> torch.Tensor | None:
    if isinstance(value, fx.Node) and value.op == "get_attr":
        owner, _, attr = str(value.target).rpartition(".")
        try:
            t = getattr(gm.get_submodule(owner), attr, None)
        except AttributeError:
            return None
        return t if isinstance(t, torch.Tensor) else None
    return value if isinstance(value, torch.Tensor) else None


def _module_info(node: fx.Node, m: nn.Module, kind: Kind, op: str, params: dict[str, Any],
                 weight: Any = None, bias: Any = None) -> OpInfo:
    """Module calls: positional args and tensor-valued kwargs are data, other kwargs parameters."""
    inputs = tuple(node.args) + tuple(v for v in node.kwargs.values() if isinstance(v, fx.Node))
    extra = {k: v for k, v in node.kwargs.items() if not isinstance(v, fx.Node)}
    weight = weight if isinstance(weight, torch.Tensor) else None
    bias = bias if isinstance(bias, torch.Tensor) else None
    return OpInfo(kind, op, node, m, inputs, {**params, **extra}, weight, bias)


def _describe_module(node: fx.Node, m: nn.Module) -> OpInfo:
    for cls, rule in _MODULE_RULES.items():
        if isinstance(m, cls):
            kind, op, params = rule(m)
            return _module_info(node, m, kind, op, params, getattr(m, "weight", None), getattr(m, "bias", None))
    conv = next(((d, t) for table, t in ((_CONV_MODULES, False), (_CONVT_MODULES, True))
                 for c, d in table.items() if isinstance(m, c)), None)
    if conv is not None:
        dims, transposed = conv
        params = {"groups": m.groups, "transposed": transposed, "stride": m.stride, "padding": m.padding,
                  "dilation": m.dilation, "kernel_size": m.kernel_size, "spatial_dims": dims, "channel_dim": 1}
        if transposed:
            params["output_padding"] = m.output_padding
        return _module_info(node, m, Kind.CONV, f"conv_transpose{dims}d" if transposed else f"conv{dims}d",
                            params, m.weight, m.bias)
    if isinstance(m, nn.Linear):
        return _module_info(node, m, Kind.LINEAR, "linear", {"channel_dim": -1}, m.weight, m.bias)
    for cls, op in _NORM_MODULES.items():
        if isinstance(m, cls):
            params: dict[str, Any] = {"channel_dim": -1 if op == "layer_norm" else 1, "eps": getattr(m, "eps", None)}
            if op == "group_norm":
                params["num_groups"] = m.num_groups
            if op == "layer_norm":
                params["normalized_shape"] = m.normalized_shape
            return _module_info(node, m, Kind.NORM, op, params, getattr(m, "weight", None), getattr(m, "bias", None))
    for cls, op in _ACTIVATION_MODULES.items():
        if isinstance(m, cls):
            params = {k: getattr(m, k) for k in _ACTIVATION_PARAMS.get(op, ()) if k != "weight" and hasattr(m, k)}
            return _module_info(node, m, Kind.ACTIVATION, op, params, getattr(m, "weight", None))
    if isinstance(m, nn.Softmax):
        return _module_info(node, m, Kind.SOFTMAX, "softmax", {"dim": m.dim})
    if isinstance(m, nn.LogSoftmax):
        return _module_info(node, m, Kind.SOFTMAX, "log_softmax", {"dim": m.dim})
    for cls, op in _POOL_MODULES.items():
        if isinstance(m, cls):
            params = {k: getattr(m, k) for k in _POOL_ATTRS if hasattr(m, k)}
            return _module_info(node, m, Kind.POOL, op, {**params, "channel_dim": 1})
    for cls, mode in _PAD_MODULES.items():
        if isinstance(m, cls):
            value = float(getattr(m, "value", 0.0)) if mode == "constant" else None
            return _module_info(node, m, Kind.POOL, "pad",
                                {"pad": tuple(m.padding), "mode": mode, "value": value, "channel_dim": 1})
    if isinstance(m, nn.Upsample):
        params = {"size": m.size, "scale_factor": m.scale_factor, "mode": m.mode,
                  "align_corners": m.align_corners, "channel_dim": 1}
        return _module_info(node, m, Kind.POOL, "interpolate", params)
    if isinstance(m, _IDENTITY_MODULES):
        is_dropout = not isinstance(m, nn.Identity)
        params = {"training": m.training, "p": m.p} if is_dropout else {}
        return _module_info(node, m, Kind.IDENTITY, "dropout" if is_dropout else "identity", params)
    if isinstance(m, nn.Flatten):
        return _module_info(node, m, Kind.RESHAPE, "flatten", {"start_dim": m.start_dim, "end_dim": m.end_dim})
    if isinstance(m, nn.Unflatten):
        return _module_info(node, m, Kind.RESHAPE, "unflatten", {"dim": m.dim, "sizes": m.unflattened_size})
    if isinstance(m, nn.Embedding):
        return _module_info(node, m, Kind.EMBEDDING, "embedding",
                            {"channel_dim": -1, "padding_idx": m.padding_idx}, m.weight)
    if isinstance(m, nn.MultiheadAttention):
        params = {"num_heads": m.num_heads, "embed_dim": m.embed_dim, "batch_first": m.batch_first,
                  "channel_dim": -1}
        return _module_info(node, m, Kind.ATTENTION, "multihead_attention", params, m.in_proj_weight,
                            m.in_proj_bias)
    return _module_info(node, m, Kind.UNKNOWN, type(m).__name__, {})


_CHANNEL_DIM = {Kind.CONV: 1, Kind.LINEAR: -1, Kind.EMBEDDING: -1, Kind.POOL: 1, Kind.ATTENTION: -1}


def describe(node: fx.Node, gm: fx.GraphModule) -> OpInfo:
    """What ``node`` of ``gm`` means (never raises for unknown targets: ``Kind.UNKNOWN``)."""
    if node.op == "placeholder":
        return OpInfo(Kind.PLACEHOLDER, "placeholder", node)
    if node.op == "output":
        return OpInfo(Kind.OUTPUT, "output", node, inputs=tuple(node.args))
    if node.op == "get_attr":
        return OpInfo(Kind.CONSTANT, "get_attr", node, weight=_attr_tensor(gm, node))
    if node.op == "call_module":
        try:
            module = gm.get_submodule(str(node.target))
        except AttributeError:
            return OpInfo(Kind.UNKNOWN, str(node.target), node, inputs=tuple(node.args))
        return _describe_module(node, module)
    if node.op == "call_function":
        entry = _function_entry(node.target)
    else:
        entry = _METHODS.get(str(node.target))
    if entry is None:
        name = getattr(node.target, "__name__", str(node.target))
        return OpInfo(Kind.UNKNOWN, name, node, inputs=tuple(node.args))
    kind, op, data_names, names = entry
    if op == "einsum":
        operands = node.args[1:]
        if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
            operands = tuple(operands[0])
        return OpInfo(kind, op, node, inputs=tuple(operands), params={"equation": node.args[0]})
    data, params = _bind(node, data_names, names)
    if kind is Kind.CONCAT and data:
        data = tuple(data[0])  # cat/stack take one sequence of tensors
    for key, value in _PARAM_DEFAULTS.get(op, {}).items():
        params.setdefault(key, value)
    if op == "pad" and not _spatial_pad(data, params):
        return OpInfo(Kind.UNKNOWN, op, node, inputs=tuple(node.args))
    if kind is Kind.CONV:
        params["transposed"] = op.startswith("conv_transpose")
        params["spatial_dims"] = int(op[-2])
        params.setdefault("groups", 1)
    if kind in _CHANNEL_DIM or kind is Kind.NORM:
        params["channel_dim"] = -1 if op == "layer_norm" else _CHANNEL_DIM.get(kind, 1)
    w, b = params.get("weight"), params.get("bias")
    return OpInfo(kind, op, node, None, data, params, _attr_tensor(gm, w), _attr_tensor(gm, b),
                  w if isinstance(w, fx.Node) else None, b if isinstance(b, fx.Node) else None)


def _spatial_pad(data: tuple, params: dict[str, Any]) -> bool:
    """Whether an ``F.pad`` pads only the dims after the channels (of a batched input)."""
    shape = tensor_shape(data[0]) if data else None
    pad = params.get("pad")
    return shape is not None and isinstance(pad, (tuple, list)) and len(pad) % 2 == 0 \
        and len(pad) // 2 <= len(shape) - 2


def tensor_shape(node: Any) -> tuple[int, ...] | None:
    """The shape recorded on a node by capture (``tensor_meta``), or None for non-tensors."""
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


_WEIGHTED_LAYERS = (nn.modules.conv._ConvNd, nn.Linear, nn.Bilinear, nn.MultiheadAttention, nn.RNNBase)


def layers_inside(module: nn.Module, types: tuple[type, ...] = _WEIGHTED_LAYERS) -> list[str]:
    """Paths (relative to ``module``) of the conv, linear, attention and recurrent layers inside it
    (or of the given ``types``).

    For a module the graph calls as one node without describing it (a leaf
    kept whole, such as ``nn.TransformerEncoder``, which symbolic tracing
    cannot enter), these layers are out of every pass's reach: reports say so
    instead of counting them as nothing.
    """
    found: list[str] = []
    for name, m in module.named_modules():
        # a layer inside a layer (attention's out_proj) is part of it, not one more
        if name and isinstance(m, types) and not any(name.startswith(f"{outer}.") for outer in found):
            found.append(name)
    return found

