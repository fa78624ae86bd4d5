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

from fxcompress.ops import Kind, OpInfo, describe
from fxcompress.quant.activations import preserves_qparams
from fxcompress.quant.fusion import FusedChain, is_float_value, match_chain

__all__ = ["RESIDUAL_ADDS", "find_chains", "consumed_quantized", "is_cat", "is_separate_add"]


#: What ``find_chains`` does with a conv's residual add: fuse it into the conv (x86's ``sum``),
#: or quantize the conv's output and add the two uint8 values on their own (ONNX's
#: QLinearConv + QLinearAdd, which onnxruntime fuses QDQ graphs into).
RESIDUAL_ADDS = ("fuse", "separate")


def find_chains(gm: fx.GraphModule, ops: list[OpInfo], residual_adds: str = "fuse") -> dict[fx.Node, FusedChain]:
    """The fused chain of each quantized op (``ops`` in graph order), keyed by op node.

    An add both operands of which are fusable conv outputs is fused into the first conv
    in graph order; the other conv's chain ends before it. With ``residual_adds="separate"``
    no add is fused: the conv's chain ends at the conv, and the add (with the ReLU after it)
    becomes a chain of its own, keyed by the add, whose ``data`` is the conv's output (or the
    eval-mode no-ops after it: EfficientNet's stochastic depth, which keep its codes) and
    ``residual`` the other operand: both are then consumed quantized.
    """
    chains: dict[fx.Node, FusedChain] = {}
    claimed: set[fx.Node] = set()  # adds already fused into an earlier op
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
                                         reach.residual, reach.post_op, reach.post_op_args)
            chains[op] = match_chain(info, gm, through_noops=False, allow_add=False)
            continue
        chain = match_chain(info, gm, through_noops=False)
        if chain.add in claimed:
            chain = match_chain(info, gm, through_noops=False, allow_add=False)
        if chain.add is not None:
            claimed.add(chain.add)
        chains[op] = chain
    return chains


def consumed_quantized(gm: fx.GraphModule, chains: dict[fx.Node, FusedChain]) -> set[fx.Node]:
    """The float values some consumer takes quantized (see the module docstring).

    One backward walk: every consumer comes after its producer in graph order,
    and a fused add's chain end after the add's operands.
    """
    data_of = {c.op: c for c in chains.values() if c.data is not None}
    residual_of = {c.add: c for c in chains.values() if c.add is not None}
    wanted: set[fx.Node] = set()

    def takes_quantized(user: fx.Node, value: fx.Node) -> bool:
        chain = data_of.get(user)
        if chain is not None and chain.data is value:
            return not is_separate_add(chain) or chain.end in wanted  # a separate add: for a quantized sum only
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


def is_separate_add(chain: FusedChain) -> bool:
    """Whether ``chain`` is a residual add of its own (``residual_adds="separate"``)."""
    return chain.op is chain.add


def is_cat(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether ``node`` concatenates (``torch.cat`` in any form; not ``stack``)."""
    info = describe(node, gm)
    return info.kind is Kind.CONCAT and info.op == "cat"


def _all_float_inputs(node: fx.Node, gm: fx.GraphModule) -> bool:
    return all(is_float_value(i) for i in describe(node, gm).inputs)
