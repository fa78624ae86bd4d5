"""Where a lowered graph holds integer activations: the analysis behind ``insert_observers``.

Static quantization computes each quantized op (a conv or linear) on integer
inputs and lets it emit an integer output, requantized inside the kernel, so
the activation quantization points are fixed by what the x86 kernels fuse:

* a quantized op's **output is quantized at the end of its fused chain**: the
  op, then optionally (convs only) a residual ``add`` of a same-shaped tensor
  (oneDNN's ``sum`` post-op), then optionally one fusable activation (for a
  conv: relu, relu6/hardtanh, hardswish, silu; with a residual add only relu;
  for a linear also gelu, tanh, leaky_relu).  Every op of the chain but the
  last must have a single user.  The chain end is quantized only if some
  consumer takes a quantized input (below); otherwise the op emits float.
* A value is **consumed quantized** by a quantized op (its data input), by the
  residual operand of a fused add whose chain end is quantized, by a ``cat``
  whose output is consumed quantized (all of its inputs then share one set of
  qparams), and by an op that preserves qparams
  (:func:`~fxcompress.quant.activations.preserves_qparams`) whose output is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from fxcompress.ops import Kind, OpInfo, describe
from fxcompress.quant.activations import preserves_qparams
from fxcompress.quant.lowering.chains import only_user, residual_operand

__all__ = ["CONV_POST_OPS", "LINEAR_POST_OPS", "Chain", "find_chains", "consumed_quantized", "is_float_value",
           "is_cat"]

#: Activations fused into a quantized conv's output (and relu after a residual add).
CONV_POST_OPS = frozenset({"relu", "relu6", "hardtanh", "hardswish", "silu"})
#: Activations fused into a quantized linear's output.
LINEAR_POST_OPS = CONV_POST_OPS | {"gelu", "tanh", "leaky_relu"}


@dataclass(frozen=True)
class Chain:
    """A quantized op and what x86 fuses after it.

    ``data`` is the op's activation input (None for an embedding, whose input
    is indices), ``residual`` the other operand of a fused add, ``add`` the add
    node, ``end`` the node whose output is the chain's (quantized) output.
    """

    op: fx.Node
    data: fx.Node | None
    end: fx.Node
    add: fx.Node | None = None
    residual: fx.Node | None = None


def is_float_value(node: object) -> bool:
    """Whether a node computes one floating-point tensor (from its ``tensor_meta``)."""
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    dtype = getattr(meta, "dtype", None)
    return isinstance(dtype, torch.dtype) and dtype.is_floating_point


def _residual_add(op: fx.Node, user: fx.Node | None, gm: fx.GraphModule, claimed: set[fx.Node]) -> fx.Node | None:
    """The other operand when ``user`` is ``op + other`` on same-shaped float tensors, else None."""
    if user is None or user in claimed:
        return None
    other = residual_operand(user, op, gm)
    return other if other is not None and is_float_value(other) else None


def _post_op(node: fx.Node | None, gm: fx.GraphModule, allowed: frozenset[str]) -> bool:
    if node is None:
        return False
    info = describe(node, gm)
    return info.kind is Kind.ACTIVATION and info.op in allowed


def find_chains(gm: fx.GraphModule, ops: list[OpInfo]) -> dict[fx.Node, Chain]:
    """The fused chain of each quantized op (``ops`` in graph order), keyed by op node."""
    chains: dict[fx.Node, Chain] = {}
    claimed: set[fx.Node] = set()  # adds already fused into an earlier op
    for info in ops:
        op = info.node
        if info.kind is Kind.EMBEDDING:
            chains[op] = Chain(op, None, op)
            continue
        data = info.inputs[0] if info.inputs and isinstance(info.inputs[0], fx.Node) else None
        end, add, residual = op, None, None
        user = only_user(op)
        if info.kind is Kind.CONV and not info.transposed:
            residual = _residual_add(op, user, gm, claimed)
        if residual is not None:
            add = end = user
            claimed.add(add)
            if _post_op(only_user(add), gm, frozenset({"relu"})):
                end = only_user(add)
        elif _post_op(user, gm, CONV_POST_OPS if info.kind is Kind.CONV else LINEAR_POST_OPS):
            end = user
        chains[op] = Chain(op, data, end, add, residual)  # type: ignore[arg-type]
    return chains


def consumed_quantized(gm: fx.GraphModule, chains: dict[fx.Node, Chain]) -> set[fx.Node]:
    """The float values some consumer takes quantized (see the module docstring).

    One backward walk: every consumer comes after its producer in graph order,
    and a fused add's chain end after the add's operands.
    """
    data_of = {c.op: c.data for c in chains.values() if c.data is not None}
    residual_of = {c.add: c for c in chains.values() if c.add is not None}
    wanted: set[fx.Node] = set()

    def takes_quantized(user: fx.Node, value: fx.Node) -> bool:
        if data_of.get(user) is value:
            return True
        chain = residual_of.get(user)
        if chain is not None and chain.residual is value:
            return chain.end in wanted
        if user not in wanted:
            return False
        if preserves_qparams(user, gm) is value:
            return True
        info = describe(user, gm)
        return info.kind is Kind.CONCAT and info.op == "cat" and value in info.inputs

    for node in reversed(gm.graph.nodes):
        if is_float_value(node) and any(takes_quantized(u, node) for u in node.users):
            if is_cat(node, gm) and not _all_float_inputs(node, gm):
                continue
            wanted.add(node)
    return wanted


def is_cat(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether ``node`` concatenates (``torch.cat`` in any form; not ``stack``)."""
    info = describe(node, gm)
    return info.kind is Kind.CONCAT and info.op == "cat"


def _all_float_inputs(node: fx.Node, gm: fx.GraphModule) -> bool:
    return all(is_float_value(i) for i in describe(node, gm).inputs)
