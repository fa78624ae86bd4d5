"""The ``torch.export`` front end: an exported ATen graph, brought to the dialect the passes know.

Symbolic tracing cannot capture what branches on input values or builds containers of
proxies (Hugging Face transformers' output dataclasses, ``nn.TransformerEncoderLayer``'s
fast-path checks). ``torch.export.export(..., strict=False)`` runs the Python code on
fake tensors instead and records ATen operators. :func:`export_capture` turns that
program into the graph :func:`fxcompress.trace` promises:

* every input dimension is exported as ``Dim.AUTO``, so the batch and sequence sizes stay
  symbolic (the graph reads them with ``x.size(d)``) and a model captured on one batch runs
  on others; a dimension export must fix (a size-1 example dimension, a channel count a
  weight fixes) is fixed, as export decides;
* keyword inputs keep their names, and the output keeps its structure: the graph keeps
  export's pytree calling convention, so a ``BaseModelOutput`` comes back as one;
* the ATen operators whose torch counterpart computes exactly the same thing
  (``aten.linear`` / ``F.linear``, ``aten.view`` / ``x.view``, ``aten.add.Tensor`` /
  ``torch.add``, ...) become that counterpart (:data:`_SAME_AS` and :data:`_AS_METHOD`), so
  :mod:`fxcompress.ops` describes them as it describes a symbolically traced graph; ATen
  operators without one stay as they are and describe as ``Kind.UNKNOWN`` (never guessed);
* ``addmm(bias, x, weight)`` on one module's parameters (Hugging Face's ``Conv1D`` in GPT-2, a
  linear with its weight stored ``(in, out)``) becomes ``F.linear`` on the transposed weight (a new
  parameter in the old one's place; equal up to float round-off);
* weighted ops on parameters become ``call_module`` nodes of real ``nn`` modules at the
  paths the parameters had (:func:`fxcompress.raising.raise_functional_layers`: linear, conv,
  layer norm, embedding), so ``scope`` and ``skip`` name modules as the user knows them;
  this also reaches inside ``nn.TransformerEncoder`` and ``nn.MultiheadAttention``
  (``layers.0.self_attn.in_proj`` holds the packed query/key/value projection);
* export's runtime guards (``_guards_fn``, tensor-metadata and symbolic-range asserts,
  the input-constraint hooks) are dropped: they check export's assumptions about sizes,
  which the graph no longer makes, and would refuse the other batch sizes it runs;
* node metadata keeps ``nn_module_stack`` and ``stack_trace`` (fake tensors are dropped;
  capture records real ``tensor_meta``).

The model is never changed: export runs with the RNG forked, and :mod:`fxcompress.capture`
restores its buffers afterwards.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.export import Dim
from torch.utils import _pytree as pytree

from .errors import TraceError

__all__ = ["export_capture", "FRONTENDS", "FRONTEND_KEY", "containers_kept_whole"]

#: The front ends :func:`fxcompress.trace` takes.
FRONTENDS = ("auto", "fx", "export")
#: ``gm.meta`` entry naming the front end that captured a graph (and why, for ``auto``).
FRONTEND_KEY = "fxcompress_frontend"

aten = torch.ops.aten

# ATen overload -> the torch function computing the same result from the same arguments.
_SAME_AS: dict[Any, Any] = {
    aten.linear.default: F.linear,
    aten.conv1d.default: F.conv1d, aten.conv2d.default: F.conv2d, aten.conv3d.default: F.conv3d,
    aten.gelu.default: F.gelu, aten.relu.default: F.relu, aten.silu.default: F.silu,
    aten.tanh.default: torch.tanh, aten.sigmoid.default: torch.sigmoid,
    aten.dropout.default: F.dropout,  # (input, p, train): F.dropout's (input, p, training)
    aten.scaled_dot_product_attention.default: F.scaled_dot_product_attention,
    aten.add.Tensor: torch.add, aten.sub.Tensor: torch.sub, aten.mul.Tensor: torch.mul,
    aten.div.Tensor: torch.div,
    aten.matmul.default: torch.matmul, aten.bmm.default: torch.bmm,
    aten.reshape.default: torch.reshape, aten.transpose.int: torch.transpose, aten.permute.default: torch.permute,
    aten.unsqueeze.default: torch.unsqueeze, aten.squeeze.dim: torch.squeeze,
    aten.flatten.using_ints: torch.flatten, aten.softmax.int: torch.softmax, aten.cat.default: torch.cat,
    aten.mean.dim: torch.mean, aten.clone.default: torch.clone,
    aten.split.Tensor: torch.split, aten.pow.Tensor_Scalar: torch.pow,  # GPT-2's c_attn split, gelu_new's x ** 3
}
# ATen overload -> the tensor method computing the same result from the same arguments.
_AS_METHOD: dict[Any, str] = {
    aten.view.default: "view", aten.expand.default: "expand", aten.contiguous.default: "contiguous",
    aten.sym_size.int: "size", aten.unflatten.int: "unflatten", aten.to.dtype: "to",
}
# Export's checks of its own assumptions (dtypes, size ranges): they return nothing the graph uses.
_GUARDS = (aten._assert_tensor_metadata.default, aten._assert_scalar.default,
           aten.sym_constrain_range_for_size.default)
_KEPT_META = ("nn_module_stack", "stack_trace")


def _dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """``Dim.AUTO`` for every dimension of every tensor input, keyed by ``forward``'s argument names."""
    bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments

    def spec(value: Any) -> Any:
        return {d: Dim.AUTO for d in range(value.dim())} if isinstance(value, torch.Tensor) else None

    return {name: pytree.tree_map(spec, value) for name, value in bound.items()}


def _embedding(node: fx.Node) -> tuple[tuple, dict] | None:
    """``aten.embedding(weight, indices, padding_idx, scale_grad_by_freq, sparse)`` as ``F.embedding``'s
    arguments, when the gradient-only flags are off (they are in every exported inference graph)."""
    weight, indices, *rest = node.args
    padding_idx, scale_grad, sparse = (list(rest) + [-1, False, False][len(rest):])[:3]
    if scale_grad or sparse:
        return None
    return (indices, weight), ({"padding_idx": padding_idx} if padding_idx != -1 else {})


def _parameter_at(gm: fx.GraphModule, node: Any) -> tuple[nn.Module, str, nn.Parameter] | None:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    owner, _, name = str(node.target).rpartition(".")
    try:
        module = gm.get_submodule(owner)
    except AttributeError:
        return None
    value = getattr(module, name, None)
    return (module, name, value) if isinstance(value, nn.Parameter) else None


def _transposed_linear(gm: fx.GraphModule, node: fx.Node) -> tuple[tuple, dict] | None:
    """``addmm(bias, x, weight)`` on the parameters of one module (Hugging Face's ``Conv1D``, GPT-2's
    projections: a linear whose weight is stored ``(in, out)``) as ``F.linear`` arguments, the weight
    stored transposed in its place, so it is raised to an ``nn.Linear`` like any other. The product
    is the same up to float round-off (the GEMM reads the weight in the other order)."""
    if node.kwargs or len(node.args) != 3:
        return None
    bias, x, weight = node.args
    b, w = _parameter_at(gm, bias), _parameter_at(gm, weight)
    if b is None or w is None or b[0] is not w[0] or w[2].dim() != 2 or len(weight.users) != 1:
        return None
    module, name, param = w
    setattr(module, name, nn.Parameter(param.detach().t().contiguous(), requires_grad=param.requires_grad))
    return (x, weight, bias), {}


def _to_torch_dialect(gm: fx.GraphModule) -> None:
    """Drop export's guards and rewrite the ATen ops that have an exact torch counterpart."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target) == "_guards_fn":
            graph.erase_node(node)
            continue
        if node.op != "call_function":
            continue
        if node.target in _GUARDS:
            graph.erase_node(node)
            continue
        new_args: tuple[tuple, dict] | None = None
        with graph.inserting_before(node):
            if node.target in _SAME_AS:
                new = graph.call_function(_SAME_AS[node.target], node.args, node.kwargs)
            elif node.target in _AS_METHOD:
                new = graph.call_method(_AS_METHOD[node.target], node.args, node.kwargs)
            elif node.target is aten.layer_norm.default:  # cudnn_enable (the 6th) chooses a CUDA kernel
                new = graph.call_function(F.layer_norm, tuple(node.args[:5]), {})
            elif node.target is aten.embedding.default and (new_args := _embedding(node)) is not None:
                new = graph.call_function(F.embedding, *new_args)
            elif node.target is aten.addmm.default and (new_args := _transposed_linear(gm, node)) is not None:
                new = graph.call_function(F.linear, *new_args)
            else:
                continue
        new.meta = {k: v for k, v in node.meta.items() if k in _KEPT_META}
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    for node in graph.nodes:
        node.meta = {k: v for k, v in node.meta.items() if k in _KEPT_META}
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    graph.eliminate_dead_code()  # the size reads only the guards used


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0].strip()}" if lines else type(exc).__name__


def export_capture(model: nn.Module, args: tuple, kwargs: dict) -> fx.GraphModule:
    """``model`` captured with ``torch.export`` (non-strict) in the module-level dialect (see the module
    docstring); raises :class:`TraceError` with export's reason when export cannot capture it."""
    from .raising import raise_functional_layers

    try:
        dynamic = _dynamic_shapes(model, args, kwargs)
    except TypeError as exc:
        raise TraceError(f"torch.export cannot bind the example inputs to {type(model).__name__}.forward: {exc}") \
            from exc
    with torch.random.fork_rng(devices=[]):  # the caller (capture) restores the buffers
        try:
            program = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic, strict=False)
        except Exception as exc:  # export's many error types: each is a reason the model cannot be exported
            raise TraceError(f"torch.export (non-strict) cannot capture {type(model).__name__}: "
                             f"{_first_line(exc)}") from exc
    unlifted = program.module()
    _to_torch_dialect(unlifted)
    gm = fx.GraphModule(unlifted, unlifted.graph, type(model).__name__)  # drops export's input hooks
    gm.training = model.training
    for name, module in gm.named_modules():
        try:
            module.training = model.get_submodule(name).training if name else model.training
        except AttributeError:
            pass
    raise_functional_layers(gm, norms_and_embeddings=True)
    return gm


def containers_kept_whole(gm: fx.GraphModule) -> list[str]:
    """Paths of the ``torch.nn`` modules (``nn.TransformerEncoder``, ...) that ``gm`` calls as one node
    though they hold linear layers, which no pass can then reach."""
    from .ops import Kind, describe_module, layers_inside

    found = []
    for node in gm.graph.find_nodes(op="call_module"):
        module = gm.get_submodule(str(node.target))
        if not type(module).__module__.startswith("torch.nn."):
            continue
        if describe_module(module).kind is Kind.UNKNOWN and layers_inside(module, (Kind.LINEAR, Kind.ATTENTION)):
            found.append(str(node.target))
    return found

