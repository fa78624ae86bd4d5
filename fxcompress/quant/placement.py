"""Where a lowered graph holds integer activations: the analysis behind ``insert_observers``.

Static quantization computes each quantized op (a conv or linear) on integer
inputs and lets it emit an integer output, requantized inside the kernel, so
the activation quantization points are fixed by what the x86 kernels fuse
(:mod:`fxcompress.quant.fusion`, the chains ``lower`` fuses too):

* a quantized op's **output is quantized at the end of its fused chain** (the
  op, then for a 2-D conv a residual ``add`` of a same-shaped tensor, then one
  activation the kernel fuses), matched as written: an eval-mode no-op ends a
  chain here (see :mod:`fxcompress.quant.fusion` for why lowering still agrees).
  The chain end is quantized only if some consumer takes a quantized input
  (below); otherwise the op emits float.
* A value is **consumed quantized** by a quantized op (its data input), by the
  residual operand of a fused add whose chain end is quantized, by a ``cat``
  whose output is consumed quantized (all of its inputs then share one set of
  qparams), and by an op that preserves qparams
  (:func:`~fxcompress.quant.activations.preserves_qparams`) whose output is.
"""

from __future__ import annotations

from torch import fx

from fxcompress.ops import Kind, OpInfo, describe, tensor_shape
from fxcompress.quant.activations import preserves_qparams
from fxcompress.quant.fusion import TABLE_ACTIVATIONS, FusedChain, is_float_value, match_chain, only_user, post_op_of

__all__ = ["RESIDUAL_ADDS", "POST_OP_PLACEMENTS", "TABLE_FREE_POST_OPS", "find_chains", "consumed_quantized",
           "residual_chains", "is_cat"]


#: What ``find_chains`` does with a conv's residual add: fuse it into the conv (x86's ``sum``),
#: or quantize the conv's output and add the two uint8 values on their own (ONNX's
#: QLinearConv + QLinearAdd, which onnxruntime fuses QDQ graphs into).
RESIDUAL_ADDS = ("fuse", "separate")
#: What ``find_chains`` does with an activation after a conv or linear: fuse every one the x86
#: kernel fuses, or only :data:`TABLE_FREE_POST_OPS`, the others becoming uint8 tables
#: (QLinearConv fuses only clamps; a table is ONNX ``GatherElements``).
POST_OP_PLACEMENTS = ("fuse", "tables")
#: The post-ops a chain keeps with ``post_ops="tables"``: clamps of the codes.
TABLE_FREE_POST_OPS = ("none", "relu", "hardtanh")


def find_chains(gm: fx.GraphModule, ops: list[OpInfo], residual_adds: str = "fuse",
                post_ops: str = "fuse") -> dict[fx.Node, FusedChain]:
    """The fused chain of each quantized op (``ops`` in graph order), keyed by op node.

    An add both operands of which are fusable conv outputs is fused into the first conv
    in graph order; the other conv's chain ends before it. With ``residual_adds="separate"``
    no add is fused: the conv's chain ends at the conv, and the add (with the ReLU after it)
    becomes a standalone chain, keyed by the add, whose ``data`` is the conv's output (or the
    eval-mode no-ops after it: EfficientNet's stochastic depth, which keep its codes) and
    ``residual`` the other operand. With ``post_ops="tables"`` a chain ends before an
    activation other than :data:`TABLE_FREE_POST_OPS` (fusable or not: GELU after a conv, the
    sigmoid of a gate), which becomes a standalone chain keyed by the activation, whose
    ``data`` is the op's output; so does each global average pool and squeeze-excitation
    product (``residual``: the gains). A standalone chain's operands are consumed quantized
    when its result is (:func:`consumed_quantized`).
    """
    chains: dict[fx.Node, FusedChain] = {}
    claimed: set[fx.Node] = set()  # adds already fused into an earlier op
    kept = TABLE_FREE_POST_OPS if post_ops == "tables" else None
    for info in ops:
        op = info.node
        if info.kind is Kind.EMBEDDING:
            chains[op] = FusedChain(op, op, (op,))
            continue
        if residual_adds == "separate":
            # A separate add may follow eval-mode no-ops (EfficientNet's stochastic depth):
            # they keep the conv's codes, so the add still takes two quantized operands.
            reach = match_chain(info, gm, through_noops=True)
            if reach.add is not None and reach.add not in claimed:
                claimed.add(add := reach.add)
                own = next(a for a in add.args if isinstance(a, fx.Node) and a is not reach.residual)
                chains[add] = FusedChain(add, reach.end, reach.nodes[reach.nodes.index(add):], own, add,
                                         reach.residual, reach.post_op, reach.post_op_args, standalone=True)
            chain = match_chain(info, gm, through_noops=False, allow_add=False)
        else:
            chain = match_chain(info, gm, through_noops=False)
            if chain.add in claimed:
                chain = match_chain(info, gm, through_noops=False, allow_add=False)
            if chain.add is not None:
                claimed.add(chain.add)
        if kept is not None:
            chain = match_chain(info, gm, through_noops=False, allow_add=chain.add is not None, post_ops=kept)
            act = only_user(chain.end)
            post = _table_post_op(act, chain.end, gm) if act is not None else None
            if post is not None:
                chains[act] = FusedChain(act, act, (act,), chain.end, post_op=post[0], post_op_args=post[1],
                                         standalone=True)
        chains[op] = chain
    if post_ops == "tables":
        chains.update(_gate_chains(gm, chains))
    return chains


def _gate_chains(gm: fx.GraphModule, chains: dict[fx.Node, FusedChain]) -> dict[fx.Node, FusedChain]:
    """With ``post_ops="tables"``: a standalone chain for each global average pool and each
    squeeze-excitation product ``x * gains`` (``(N, C, H, W)`` by ``(N, C, 1, 1)``) of float
    values, so that a gate computes on codes (onnxruntime's ``QLinearGlobalAveragePool`` and
    ``QLinearMul``) when its result is consumed quantized."""
    found: dict[fx.Node, FusedChain] = {}
    for node in gm.graph.nodes:
        if node in chains or node.op not in ("call_module", "call_function", "call_method"):
            continue
        info = describe(node, gm)
        inputs = [i for i in info.inputs if isinstance(i, fx.Node)]
        if not inputs or len(inputs) != len(info.inputs) or not all(is_float_value(i) for i in inputs):
            continue
        size = info.params.get("output_size")
        if info.kind is Kind.POOL and info.op == "adaptive_avg_pool2d" and size in (1, (1, 1), [1, 1]):
            found[node] = FusedChain(node, node, (node,), inputs[0], standalone=True)
        elif info.kind is Kind.ELEMENTWISE and info.op == "mul" and len(inputs) == 2:
            shapes = [tuple(tensor_shape(i) or ()) for i in inputs]
            for (x, sx), (gains, sg) in (((inputs[0], shapes[0]), (inputs[1], shapes[1])),
                                         ((inputs[1], shapes[1]), (inputs[0], shapes[0]))):
                if len(sx) == 4 and sg == (sx[0], sx[1], 1, 1):
                    found[node] = FusedChain(node, node, (node,), x, residual=gains, standalone=True)
                    break
    return found


def residual_chains(chains: dict[fx.Node, FusedChain]) -> dict[fx.Node, FusedChain]:
    """The chains with a second operand, keyed by the node taking it: the fused add, or the
    standalone chain's own node (a separate add, a gate product)."""
    return {(c.op if c.standalone else c.add): c for c in chains.values() if c.residual is not None}


def _table_post_op(node: fx.Node, value: fx.Node, gm: fx.GraphModule) -> tuple[str, tuple[float, ...]] | None:
    """The post-op (name, scalars) of ``node`` when it is an activation of ``value`` a table
    computes (:data:`~fxcompress.quant.fusion.TABLE_ACTIVATIONS`, but the clamps)."""
    if not node.args or node.args[0] is not value:
        return None
    info = describe(node, gm)
    post = post_op_of(info, TABLE_ACTIVATIONS) if info.kind is Kind.ACTIVATION else None
    return post if post is not None and post[0] not in TABLE_FREE_POST_OPS else None


def consumed_quantized(gm: fx.GraphModule, chains: dict[fx.Node, FusedChain]) -> set[fx.Node]:
    """The float values some consumer takes quantized (see the module docstring).

    One backward walk: every consumer comes after its producer in graph order,
    and a fused add's chain end after the add's operands.
    """
    data_of = {c.op: c for c in chains.values() if c.data is not None}
    residual_of = residual_chains(chains)
    wanted: set[fx.Node] = set()

    def takes_quantized(user: fx.Node, value: fx.Node) -> bool:
        chain = data_of.get(user)
        if chain is not None and chain.data is value:
            return not chain.standalone or chain.end in wanted  # standalone: for a quantized result only
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
