"""Multiply-accumulate counts over a shape-annotated ``GraphModule``.

Every node must carry ``node.meta["tensor_meta"]`` (``fxcompress.trace`` puts
it there; so does ``torch.fx.passes.shape_prop.ShapeProp``).  Counts come from
shapes alone, analytically: no forward is run, so they hold for any batch the
shapes describe and cost microseconds per node.

Kinds (the keys of :func:`macs_by_kind`):

- ``"conv"``: ``nn.Conv{1,2,3}d``, ``nn.ConvTranspose{1,2,3}d`` (grouped too)
  and the ``F.conv*`` / ``F.conv_transpose*`` functions;
- ``"linear"``: ``nn.Linear`` / ``F.linear`` on inputs of any rank, and the
  projections inside attention (``nn.MultiheadAttention``'s q/k/v/out,
  torchvision Swin's ``qkv`` and ``proj``);
- ``"matmul"``: products of two activations written out in the graph:
  ``@``, ``matmul``, ``mm``, ``bmm``, ``addmm``, ``baddbmm``, two-operand
  ``einsum``;
- ``"attention"``: the two products of attention done inside one node
  (scores ``Q·Kᵀ`` and ``weights·V``): ``F.scaled_dot_product_attention``,
  ``nn.MultiheadAttention``, torchvision Swin's wrapped
  ``shifted_window_attention`` (on its padded, windowed input);
- ``"other"``: ``nn.Bilinear`` / ``F.bilinear`` and the recurrent modules
  ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU``.

Conventions match ``torch.utils.flop_counter.FlopCounterMode`` (which counts
FLOPs = 2 x MACs): a product of an ``[m, k]`` and a ``[k, n]`` matrix is
``m*k*n`` MACs, a convolution is ``output elements x input channels per group
x kernel elements`` (``input elements x output channels per group x kernel
elements`` when transposed), and bias additions, norms, activations and
softmax are not counted.  Nodes of any other kind count zero; :func:`uncounted`
names the modules kept whole (leaves nothing describes, e.g. ``nn.TransformerEncoder``)
whose layers inside are therefore missing from the count, so reports can say so.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import fx, nn

from fxcompress.errors import InputError
from fxcompress.ops import Kind, attr_value, describe, layers_inside
from fxcompress.ops.tables import module_rule

__all__ = ["KINDS", "count_macs", "macs_by_kind", "uncounted", "register_module", "count_conv", "count_linear"]

KINDS: tuple[str, ...] = ("conv", "linear", "matmul", "attention", "other")

_Counts = dict[str, int]
_Counter = Callable[[fx.GraphModule, fx.Node], _Counts]


def count_macs(gm: fx.GraphModule) -> int:
    """Total multiply-accumulates of one forward of ``gm`` at its annotated shapes."""
    return sum(macs_by_kind(gm).values())


def macs_by_kind(gm: fx.GraphModule) -> dict[str, int]:
    """Multiply-accumulates of ``gm`` per kind; every key of :data:`KINDS` is present.

    Raises :class:`~fxcompress.errors.InputError` if a node that is counted
    lacks shape metadata.
    """
    totals = dict.fromkeys(KINDS, 0)
    for node in gm.graph.nodes:
        counter = _counter_for(gm, node)
        if counter is None:
            continue
        for kind, macs in counter(gm, node).items():
            totals[kind] += macs
    return totals


def uncounted(gm: fx.GraphModule) -> dict[str, str]:
    """``{node: why}`` for each module call whose MACs are not counted although it holds layers
    that have MACs (a module kept whole, which no counter describes)."""
    found = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or _counter_for(gm, node) is not None:
            continue
        module = gm.get_submodule(str(node.target))
        inside = layers_inside(module)
        if inside:
            found[node.name] = (f"{type(module).__name__} is kept whole: its {len(inside)} layers with MACs "
                                f"inside ({', '.join(inside[:3])}{', ...' if len(inside) > 3 else ''}) are not "
                                f"counted")
    return found


# --- shape helpers -------------------------------------------------------------


def _shape(gm: fx.GraphModule, value: Any, owner: fx.Node) -> torch.Size:
    """The shape of an argument: a node's ``tensor_meta``, or a constant tensor's own."""
    if isinstance(value, torch.Tensor):
        return value.shape
    if not isinstance(value, fx.Node):
        raise InputError(
            f"node {owner.name!r} ({owner.format_node()}): expected a tensor argument, got "
            f"{type(value).__name__}"
        )
    meta = value.meta.get("tensor_meta")
    if meta is not None and hasattr(meta, "shape"):
        return meta.shape
    if value.op == "get_attr":
        attr = attr_value(gm, str(value.target))
        if isinstance(attr, torch.Tensor):
            return attr.shape
    raise InputError(
        f"node {value.name!r} (an input of {owner.name!r}) has no shape metadata: "
        "count MACs on a graph from fxcompress.trace(), or run "
        "torch.fx.passes.shape_prop.ShapeProp(gm).propagate(*inputs) first"
    )


def _out_shape(gm: fx.GraphModule, node: fx.Node) -> torch.Size:
    return _shape(gm, node, node)


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


# --- counters --------------------------------------------------------------------


def _conv(out_or_in: torch.Size, weight: torch.Size) -> int:
    # weight: [C_out, C_in/groups, *k] (or [C_in, C_out/groups, *k] when transposed);
    # the spatial size that multiplies it is the output's (the input's when transposed).
    return math.prod(out_or_in) * math.prod(weight[1:])


def count_conv(gm: fx.GraphModule, node: fx.Node, weight_shape: Sequence[int], transposed: bool = False) -> _Counts:
    """MACs of a conv-like module call with this weight shape (for modules of our own)."""
    size = _shape(gm, node.args[0], node) if transposed else _out_shape(gm, node)
    return {"conv": _conv(size, torch.Size(weight_shape))}


def count_linear(gm: fx.GraphModule, node: fx.Node, in_features: int) -> _Counts:
    """MACs of a linear-like module call with ``in_features`` inputs per output."""
    return {"linear": math.prod(_out_shape(gm, node)) * in_features}


def _conv_module(gm: fx.GraphModule, node: fx.Node) -> _Counts:
    module = gm.get_submodule(str(node.target))
    return count_conv(gm, node, module.weight.shape, module.transposed)


def _conv_function(transposed: bool) -> _Counter:
    def count(gm: fx.GraphModule, node: fx.Node) -> _Counts:
        weight = _shape(gm, _arg(node, 1, "weight"), node)
        size = _shape(gm, _arg(node, 0, "input"), node) if transposed else _out_shape(gm, node)
        return {"conv": _conv(size, weight)}

    return count


def _linear_module(gm: fx.GraphModule, node: fx.Node) -> _Counts:
    return count_linear(gm, node, gm.get_submodule(str(node.target)).in_features)


def _linear_function(gm: fx.GraphModule, node: fx.Node) -> _Counts:
    weight = _shape(gm, _arg(node, 1, "weight"), node)
    return {"linear": math.prod(_out_shape(gm, node)) * weight[-1]}


def _matmul(first: int) -> _Counter:
    """``a @ b`` where ``a`` is positional argument ``first``: every output element
    is a dot product over ``a``'s last dimension, whatever the ranks."""

    def count(gm: fx.GraphModule, node: fx.Node) -> _Counts:
        a = _shape(gm, node.args[first], node)
        return {"matmul": math.prod(_out_shape(gm, node)) * a[-1]}

    return count


def _einsum(gm: fx.GraphModule, node: fx.Node) -> _Counts:
    equation = str(node.args[0]).replace(" ", "")
    operands = node.args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    lhs = equation.split("->")[0].split(",")
    if len(operands) != 2 or len(lhs) != 2 or "." in equation:
        return {}  # one operand (a permutation or sum) or an unusual form: no products
    sizes: dict[str, int] = {}
    for subscripts, operand in zip(lhs, operands):
        sizes.update(zip(subscripts, _shape(gm, operand, node)))
    # Two operands: one multiply-accumulate per point of the joint index space.
    return {"matmul": math.prod(sizes.values())}


def _sdpa(gm: fx.GraphModule, node: fx.Node) -> _Counts:
    q = _shape(gm, _arg(node, 0, "query"), node)
    k = _shape(gm, _arg(node, 1, "key"), node)
    out = _out_shape(gm, node)  # [..., L, Ev]
    batch_and_queries = math.prod(out[:-1])
    return {"attention": batch_and_queries * k[-2] * (q[-1] + out[-1])}


def _multihead_attention(gm: fx.GraphModule, node: fx.Node) -> _Counts:
    module: nn.MultiheadAttention = gm.get_submodule(str(node.target))
    query = _shape(gm, _arg(node, 0, "query"), node)
    key = _shape(gm, _arg(node, 1, "key"), node)
    tokens_q = math.prod(query[:-1])  # batch x target length, in either layout
    tokens_k = math.prod(key[:-1])
    seq_k = key[-2] if module.batch_first and len(key) == 3 else key[0]
    batch = tokens_k // seq_k
    seq_k += int(module.bias_k is not None) + int(module.add_zero_attn)
    embed = module.embed_dim
    projections = tokens_q * embed * embed * 2 + tokens_k * embed * (module.kdim + module.vdim)
    # Scores and weighted sum: per head L x S x head_dim each, over all heads L x S x E.
    attention = 2 * batch * (tokens_q // batch) * seq_k * embed
    return {"linear": projections, "attention": attention}


def _shifted_window_attention(gm: fx.GraphModule, node: fx.Node) -> _Counts:
    batch, height, width, channels = _shape(gm, _arg(node, 0, "input"), node)
    qkv = _shape(gm, _arg(node, 1, "qkv_weight"), node)
    proj = _shape(gm, _arg(node, 2, "proj_weight"), node)
    window = list(_arg(node, 4, "window_size"))
    # The function pads the map to whole windows and attends within each window.
    padded_h = math.ceil(height / window[0]) * window[0]
    padded_w = math.ceil(width / window[1]) * window[1]
    tokens = batch * padded_h * padded_w
    per_window = window[0] * window[1]
    return {
        "linear": tokens * (math.prod(qkv) + math.prod(proj)),
        "attention": 2 * tokens * per_window * channels,
    }


def _bilinear(gm: fx.GraphModule, node: fx.Node) -> _Counts:
    if node.op == "call_module":
        weight = gm.get_submodule(str(node.target)).weight.shape
    else:
        weight = _shape(gm, _arg(node, 2, "weight"), node)
    # weight: [out, in1, in2]; each output element is x1ᵀ W_o x2.
    return {"other": math.prod(_out_shape(gm, node)[:-1]) * math.prod(weight)}


def _recurrent(gm: fx.GraphModule, node: fx.Node) -> _Counts:
    module: nn.RNNBase = gm.get_submodule(str(node.target))
    shape = _shape(gm, node.args[0], node)
    steps = math.prod(shape[:-1])  # sequence x batch (x1 when unbatched)
    gates = {"LSTM": 4, "GRU": 3}.get(module.mode, 1)
    hidden = module.hidden_size
    recurrent = module.proj_size or hidden
    directions = 2 if module.bidirectional else 1
    total = 0
    features = module.input_size
    for _ in range(module.num_layers):
        per_step = gates * hidden * (features + recurrent) + hidden * module.proj_size
        total += directions * steps * per_step
        features = directions * recurrent
    return {"other": total}


# --- the table: what counts, and how -------------------------------------------------

# What counts, by the op fxcompress.ops.describe() names: the module, function and method
# forms of an op alike (conv and linear read their weight from the module or the arguments).
_BY_OP: dict[str, _Counter] = {
    "matmul": _matmul(0), "mm": _matmul(0), "bmm": _matmul(0), "addmm": _matmul(1), "baddbmm": _matmul(1),
    "einsum": _einsum,
    "scaled_dot_product_attention": _sdpa,
    "shifted_window_attention": _shifted_window_attention,
}
_BY_KIND: dict[Kind, tuple[_Counter | None, _Counter | None]] = {  # kind -> (module form, functional form)
    Kind.LINEAR: (_linear_module, _linear_function),
    Kind.BILINEAR: (_bilinear, _bilinear),
    Kind.RECURRENT: (_recurrent, None),
}

_REGISTERED: dict[type[nn.Module], _Counter] = {}


def register_module(cls: type[nn.Module], counter: _Counter) -> None:
    """Count a module type of fxcompress's own (or yours): ``counter(gm, node) -> {kind: macs}``.

    ``kind`` is one of :data:`KINDS`.  Registered types are consulted before
    the built-in table (subclasses included); register when the class is defined.
    """
    _REGISTERED[cls] = counter



def _counter_for(gm: fx.GraphModule, node: fx.Node) -> _Counter | None:
    if node.op not in ("call_module", "call_function", "call_method"):
        return None
    module_form = node.op == "call_module"
    if module_form:
        module = gm.get_submodule(str(node.target))
        registered = next((c for cls, c in _REGISTERED.items() if isinstance(module, cls)), None)
        if registered is not None or module_rule(module) is not None:
            return registered  # a class of ours (or yours) is counted by its own counter, or not at all
    info = describe(node, gm)
    if info.kind is Kind.CONV:
        return _conv_module if module_form else _conv_function(info.transposed)
    if info.kind is Kind.ATTENTION and info.op == "multihead_attention":
        return _multihead_attention if module_form else None
    if info.kind in _BY_KIND:
        return _BY_KIND[info.kind][0 if module_form else 1]
    return _BY_OP.get(info.op)
