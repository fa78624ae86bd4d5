"""Op semantics: what a node *means*, in one place.

Passes ask :func:`describe` "is this a conv, and where are its weight, bias,
channel dims and groups?" instead of matching node targets themselves.  The
``call_module``, ``call_function`` and ``call_method`` forms of an op (``nn.Conv2d``,
``F.conv2d``; ``torch.cat``; ``x.view``, ``torch.reshape``) all describe to the
same :class:`OpInfo`, so a new front end (e.g. ``torch.export`` raised to
module form) only has to extend the tables below.

Guarantee: :func:`describe` never guesses.  A target it does not know gets
kind ``Kind.UNKNOWN``; analyses must treat that as "semantics unknown" (e.g.
pruning freezes the channels that flow through it).
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

__all__ = ["Kind", "OpInfo", "describe", "register_function", "register_module", "tensor_shape"]


class Kind(str, enum.Enum):
    """Op families; the channel rules of pruning and quantization are per family."""

    PLACEHOLDER = "placeholder"
    OUTPUT = "output"
    CONSTANT = "constant"  # get_attr
    CONV = "conv"
    LINEAR = "linear"
    NORM = "norm"
    ELEMENTWISE = "elementwise"  # binary arithmetic with broadcasting
    ACTIVATION = "activation"  # unary, pointwise
    SOFTMAX = "softmax"
    POOL = "pool"
    RESHAPE = "reshape"
    PERMUTE = "permute"
    CONCAT = "concat"
    SPLIT = "split"
    GETITEM = "getitem"
    MATMUL = "matmul"
    EMBEDDING = "embedding"
    ATTENTION = "attention"
    REDUCTION = "reduction"
    IDENTITY = "identity"  # no-op at inference: dropout, identity, contiguous, clone
    SHAPE = "shape"  # size(), dim(), .shape: non-tensor results
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class OpInfo:
    """What one node means.

    ``op`` is a canonical name ("conv2d", "add", "view", ...).  ``inputs`` are
    the data inputs (nodes or constants) in order; ``params`` holds the
    normalised non-tensor arguments (stride, dim, groups, ...).  For weighted
    ops, ``weight``/``bias`` are the tensors (from the module or a
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
        """The activation dim that holds channels: 1 for conv/norm(NC...), -1 for linear/layer norm."""
        return int(self.params.get("channel_dim", 1))


# -- tables -----------------------------------------------------------------
_CONV_MODULES = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_CONVT_MODULES = {nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2, nn.ConvTranspose3d: 3}
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
}
_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                 nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                 nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)

# function/method name -> (kind, canonical op, argument names after the data inputs)
_Entry = tuple[Kind, str, tuple[str, ...]]
_FUNCTIONS: dict[Callable, _Entry] = {}
_METHODS: dict[str, _Entry] = {}


def register_function(fn: Callable, kind: Kind, op: str, arg_names: tuple[str, ...]) -> None:
    """Teach :func:`describe` a function target (e.g. a wrapped library function)."""
    _FUNCTIONS[fn] = (kind, op, arg_names)


_MODULE_RULES: dict[type, Callable[[nn.Module], tuple[Kind, str, dict]]] = {}


def register_module(cls: type, rule: Callable[[nn.Module], tuple[Kind, str, dict]]) -> None:
    """Teach :func:`describe` a module type: ``rule(module) -> (kind, op, params)``."""
    _MODULE_RULES[cls] = rule


def _fn(kind: Kind, op: str, names: tuple[str, ...], *targets: Callable) -> None:
    for t in targets:
        _FUNCTIONS[t] = (kind, op, names)


def _method(kind: Kind, op: str, names: tuple[str, ...], *methods: str) -> None:
    for m in methods:
        _METHODS[m] = (kind, op, names)


_CONV_ARGS = ("weight", "bias", "stride", "padding", "dilation", "groups")
_CONVT_ARGS = ("weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
for _d in (1, 2, 3):
    _fn(Kind.CONV, f"conv{_d}d", _CONV_ARGS, getattr(F, f"conv{_d}d"), getattr(torch, f"conv{_d}d"))
    _fn(Kind.CONV, f"conv_transpose{_d}d", _CONVT_ARGS, getattr(F, f"conv_transpose{_d}d"))
    for _p in ("max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool"):
        _fn(Kind.POOL, f"{_p}{_d}d", ("kernel_size",), getattr(F, f"{_p}{_d}d"))
_fn(Kind.LINEAR, "linear", ("weight", "bias"), F.linear)
_fn(Kind.NORM, "batch_norm", ("running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
    F.batch_norm)
_fn(Kind.NORM, "layer_norm", ("normalized_shape", "weight", "bias", "eps"), F.layer_norm)
_fn(Kind.NORM, "group_norm", ("num_groups", "weight", "bias", "eps"), F.group_norm)
_fn(Kind.NORM, "instance_norm", ("running_mean", "running_var", "weight", "bias"), F.instance_norm)
for _name, _targets in {
    "add": (operator.add, operator.iadd, torch.add), "sub": (operator.sub, operator.isub, torch.sub),
    "mul": (operator.mul, operator.imul, torch.mul), "div": (operator.truediv, operator.itruediv, torch.div),
    "floordiv": (operator.floordiv,), "pow": (operator.pow, torch.pow),
    "maximum": (torch.maximum,), "minimum": (torch.minimum,),
}.items():
    _fn(Kind.ELEMENTWISE, _name, ("other",), *_targets)
    _method(Kind.ELEMENTWISE, _name, ("other",), _name, f"{_name}_", f"__{_name}__", f"__i{_name}__")
_method(Kind.ELEMENTWISE, "div", ("other",), "truediv", "__truediv__", "div", "div_")
for _name in ("relu", "relu6", "gelu", "silu", "hardswish", "hardsigmoid", "sigmoid", "tanh", "mish",
              "leaky_relu", "elu", "selu", "celu", "softplus", "hardtanh", "prelu", "logsigmoid"):
    _targets = [getattr(m, _name) for m in (F, torch) if hasattr(m, _name)]
    _fn(Kind.ACTIVATION, _name, ("arg1",), *_targets)
    _method(Kind.ACTIVATION, _name, (), _name, f"{_name}_")
_fn(Kind.ACTIVATION, "neg", (), operator.neg, torch.neg)
_fn(Kind.ACTIVATION, "exp", (), torch.exp)
_fn(Kind.ACTIVATION, "sqrt", (), torch.sqrt)
_fn(Kind.ACTIVATION, "abs", (), torch.abs, operator.abs)
_method(Kind.ACTIVATION, "neg", (), "neg", "__neg__")
_method(Kind.ACTIVATION, "clamp", ("min", "max"), "clamp", "clamp_", "clip")
_fn(Kind.ACTIVATION, "clamp", ("min", "max"), torch.clamp, torch.clip)
_fn(Kind.SOFTMAX, "softmax", ("dim",), F.softmax, torch.softmax, F.log_softmax, torch.log_softmax)
_method(Kind.SOFTMAX, "softmax", ("dim",), "softmax", "log_softmax")
_fn(Kind.RESHAPE, "flatten", ("start_dim", "end_dim"), torch.flatten)
_fn(Kind.RESHAPE, "reshape", ("shape",), torch.reshape)
_fn(Kind.RESHAPE, "squeeze", ("dim",), torch.squeeze)
_fn(Kind.RESHAPE, "unsqueeze", ("dim",), torch.unsqueeze)
_method(Kind.RESHAPE, "flatten", ("start_dim", "end_dim"), "flatten")
_method(Kind.RESHAPE, "view", ("shape",), "view", "reshape")
_method(Kind.RESHAPE, "squeeze", ("dim",), "squeeze")
_method(Kind.RESHAPE, "unsqueeze", ("dim",), "unsqueeze")
_method(Kind.RESHAPE, "unflatten", ("dim", "sizes"), "unflatten")
_fn(Kind.PERMUTE, "permute", ("dims",), torch.permute)
_fn(Kind.PERMUTE, "transpose", ("dim0", "dim1"), torch.transpose)
_method(Kind.PERMUTE, "permute", ("dims",), "permute")
_method(Kind.PERMUTE, "transpose", ("dim0", "dim1"), "transpose")
_fn(Kind.CONCAT, "cat", ("dim",), torch.cat, torch.concat)
_fn(Kind.CONCAT, "stack", ("dim",), torch.stack)
_fn(Kind.SPLIT, "split", ("split_size_or_sections", "dim"), torch.split)
_fn(Kind.SPLIT, "chunk", ("chunks", "dim"), torch.chunk)
_fn(Kind.SPLIT, "unbind", ("dim",), torch.unbind)
_method(Kind.SPLIT, "split", ("split_size_or_sections", "dim"), "split")
_method(Kind.SPLIT, "chunk", ("chunks", "dim"), "chunk")
_method(Kind.SPLIT, "unbind", ("dim",), "unbind")
_fn(Kind.GETITEM, "getitem", ("index",), operator.getitem)
_fn(Kind.MATMUL, "matmul", ("other",), torch.matmul, operator.matmul, torch.bmm, torch.mm)
_method(Kind.MATMUL, "matmul", ("other",), "matmul", "bmm", "mm", "__matmul__")
_fn(Kind.MATMUL, "einsum", (), torch.einsum)
_fn(Kind.EMBEDDING, "embedding", ("weight",), F.embedding)
_fn(Kind.ATTENTION, "scaled_dot_product_attention", ("key", "value", "attn_mask", "dropout_p", "is_causal"),
    F.scaled_dot_product_attention)
for _name in ("mean", "sum", "amax", "amin", "std", "var"):
    _fn(Kind.REDUCTION, _name, ("dim", "keepdim"), getattr(torch, _name))
    _method(Kind.REDUCTION, _name, ("dim", "keepdim"), _name)
_fn(Kind.IDENTITY, "dropout", ("p", "training", "inplace"), F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    F.alpha_dropout)
_method(Kind.IDENTITY, "contiguous", (), "contiguous")
_method(Kind.IDENTITY, "clone", (), "clone")
_fn(Kind.IDENTITY, "clone", (), torch.clone)
_fn(Kind.SHAPE, "getattr", ("name",), builtins.getattr)
_method(Kind.SHAPE, "size", ("dim",), "size", "dim")


def _register_torchvision() -> None:
    """torchvision functions that ``torch.fx.wrap`` keeps whole in traced graphs."""
    try:
        from torchvision.models import swin_transformer
        from torchvision.ops import stochastic_depth
    except ImportError:  # torchvision is optional at run time
        return
    _fn(Kind.ACTIVATION, "stochastic_depth", ("p", "mode", "training"), stochastic_depth)
    _fn(Kind.ATTENTION, "shifted_window_attention",
        ("qkv_weight", "proj_weight", "relative_position_bias", "window_size", "num_heads", "shift_size",
         "attention_dropout", "dropout", "qkv_bias", "proj_bias", "logit_scale", "training"),
        swin_transformer.shifted_window_attention)
    for name in ("_patch_merging_pad", "_get_relative_position_bias"):
        if hasattr(swin_transformer, name):
            _fn(Kind.UNKNOWN, name.lstrip("_"), (), getattr(swin_transformer, name))


_register_torchvision()


# -- describe ------------------------------------------------------------------
def _bind(node: fx.Node, n_data: int, names: tuple[str, ...]) -> tuple[tuple, dict[str, Any]]:
    """Split a node's args into data inputs and named parameters."""
    data = tuple(node.args[:n_data])
    params = dict(zip(names, node.args[n_data:]))
    for k, v in node.kwargs.items():
        if k in ("input", "self"):
            data = (v, *data[1:]) if data else (v,)
        elif k == "other" and n_data == 2:
            data = (data[0], v)
        else:
            params[k] = v
    return data, params


def _attr_tensor(gm: fx.GraphModule, value: Any) -> torch.Tensor | None:
    if isinstance(value, fx.Node) and value.op == "get_attr":
        owner, _, attr = str(value.target).rpartition(".")
        t = getattr(gm.get_submodule(owner), attr, None)
        return t if isinstance(t, torch.Tensor) else None
    return value if isinstance(value, torch.Tensor) else None


def _describe_module(node: fx.Node, m: nn.Module) -> OpInfo:
    args = tuple(node.args) + tuple(node.kwargs.values())
    t = type(m)
    for cls, rule in _MODULE_RULES.items():
        if isinstance(m, cls):
            kind, op, params = rule(m)
            return OpInfo(kind, op, node, m, args, params, getattr(m, "weight", None), getattr(m, "bias", None))
    conv_dims = _CONV_MODULES.get(t) or _CONVT_MODULES.get(t)
    if conv_dims is None:
        conv_dims = next((d for c, d in {**_CONV_MODULES, **_CONVT_MODULES}.items() if isinstance(m, c)), None)
    if conv_dims is not None:
        transposed = isinstance(m, tuple(_CONVT_MODULES))
        op = f"conv_transpose{conv_dims}d" if transposed else f"conv{conv_dims}d"
        params = {"groups": m.groups, "transposed": transposed, "stride": m.stride, "padding": m.padding,
                  "dilation": m.dilation, "spatial_dims": conv_dims, "channel_dim": 1}
        return OpInfo(Kind.CONV, op, node, m, args, params, m.weight, m.bias)
    if isinstance(m, nn.Linear):
        return OpInfo(Kind.LINEAR, "linear", node, m, args, {"channel_dim": -1}, m.weight, m.bias)
    for cls, op in _NORM_MODULES.items():
        if isinstance(m, cls):
            channel_dim = -1 if op == "layer_norm" else 1
            params = {"channel_dim": channel_dim, "eps": getattr(m, "eps", None)}
            if op == "group_norm":
                params["num_groups"] = m.num_groups
            return OpInfo(Kind.NORM, op, node, m, args, params, getattr(m, "weight", None), getattr(m, "bias", None))
    for cls, op in _ACTIVATION_MODULES.items():
        if isinstance(m, cls):
            return OpInfo(Kind.ACTIVATION, op, node, m, args, {}, getattr(m, "weight", None))
    if isinstance(m, nn.Softmax):
        return OpInfo(Kind.SOFTMAX, "softmax", node, m, args, {"dim": m.dim})
    if isinstance(m, _POOL_MODULES):
        return OpInfo(Kind.POOL, t.__name__.lower(), node, m, args, {"channel_dim": 1})
    if isinstance(m, _IDENTITY_MODULES):
        return OpInfo(Kind.IDENTITY, "dropout" if "Dropout" in t.__name__ else "identity", node, m, args,
                      {"training": m.training})
    if isinstance(m, nn.Flatten):
        return OpInfo(Kind.RESHAPE, "flatten", node, m, args, {"start_dim": m.start_dim, "end_dim": m.end_dim})
    if isinstance(m, nn.Unflatten):
        return OpInfo(Kind.RESHAPE, "unflatten", node, m, args, {"dim": m.dim, "sizes": m.unflattened_size})
    if isinstance(m, nn.Embedding):
        return OpInfo(Kind.EMBEDDING, "embedding", node, m, args, {"channel_dim": -1}, m.weight)
    if isinstance(m, nn.MultiheadAttention):
        params = {"num_heads": m.num_heads, "embed_dim": m.embed_dim, "batch_first": m.batch_first,
                  "channel_dim": -1}
        return OpInfo(Kind.ATTENTION, "multihead_attention", node, m, args, params, m.in_proj_weight,
                      m.in_proj_bias)
    return OpInfo(Kind.UNKNOWN, t.__name__, node, m, args)


_N_DATA = {Kind.ELEMENTWISE: 2, Kind.MATMUL: 2, Kind.CONCAT: 1, Kind.ATTENTION: 1}


def describe(node: fx.Node, gm: fx.GraphModule) -> OpInfo:
    """What ``node`` of ``gm`` means (never raises for unknown targets: ``Kind.UNKNOWN``)."""
    if node.op == "placeholder":
        return OpInfo(Kind.PLACEHOLDER, "placeholder", node)
    if node.op == "output":
        return OpInfo(Kind.OUTPUT, "output", node, inputs=tuple(node.args))
    if node.op == "get_attr":
        return OpInfo(Kind.CONSTANT, "get_attr", node)
    if node.op == "call_module":
        return _describe_module(node, gm.get_submodule(str(node.target)))
    if node.op == "call_function":
        entry = _FUNCTIONS.get(node.target)
    else:
        entry = _METHODS.get(str(node.target))
    if entry is None:
        name = getattr(node.target, "__name__", str(node.target))
        return OpInfo(Kind.UNKNOWN, name, node, inputs=tuple(node.args))
    kind, op, names = entry
    if kind is Kind.MATMUL and op == "einsum":
        return OpInfo(kind, op, node, inputs=tuple(node.args[1:]), params={"equation": node.args[0]})
    data, params = _bind(node, _N_DATA.get(kind, 1), names)
    if kind is Kind.CONCAT:
        params.setdefault("dim", 0)
    info = OpInfo(kind, op, node, None, data, params)
    if kind in (Kind.CONV, Kind.LINEAR, Kind.NORM, Kind.EMBEDDING):
        w, b = params.get("weight"), params.get("bias")
        if kind is Kind.CONV:
            params["transposed"] = op.startswith("conv_transpose")
            params["spatial_dims"] = int(op[-2])
            params.setdefault("groups", 1)
            params["channel_dim"] = 1
        elif kind is Kind.LINEAR or op == "layer_norm" or kind is Kind.EMBEDDING:
            params["channel_dim"] = -1
        else:
            params["channel_dim"] = 1
        info = OpInfo(kind, op, node, None, data, params, _attr_tensor(gm, w), _attr_tensor(gm, b),
                      w if isinstance(w, fx.Node) else None, b if isinstance(b, fx.Node) else None)
    return info


def tensor_shape(node: Any) -> tuple[int, ...] | None:
    """The shape recorded on a node by capture (``tensor_meta``), or None for non-tensors."""
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None
