"""What a lowered int8 op absorbs from the folded graph: residual add, post-op, no-ops.

A folded conv or linear is followed, in the graph, by what oneDNN can fuse into its
kernel: for a 2-D conv a residual ``add`` of a same-shaped tensor (the ``sum`` post-op; the
1-D and 3-D convs have none, their add runs in float), then one activation (with a
residual add only ReLU). Eval-mode no-ops between them
(dropout, identity, torchvision's stochastic depth) are looked through, so
EfficientNet's ``conv -> stochastic_depth -> add`` fuses like ResNet's ``conv -> add``.
Every node of a chain but its end must have one user: its value disappears.

ReLU, ReLU6/hardtanh and leaky ReLU (comparisons and one multiply) the kernels compute
exactly as torch does. oneDNN evaluates SiLU, hardswish, GELU and tanh with its own
approximations, a float32 ulp or so away from torch's, which moves a requantized code now
and then (within the per-op contract, :mod:`fxcompress.quant.contract`); they are fused
only with ``approximate=True``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from fxcompress.ops import Kind, OpInfo, describe
from fxcompress.quant.kernels import CONV_POST_OPS, CONV_POST_OPS_BY_DIMS, LINEAR_POST_OPS

__all__ = ["FusedChain", "EXACT_POST_OPS", "match_chain", "post_op_of", "residual_operand", "only_user"]

#: Kernel post-ops whose oneDNN arithmetic equals torch's bit for bit.
EXACT_POST_OPS = ("relu", "hardtanh", "leaky_relu")


@dataclass(frozen=True)
class FusedChain:
    """An op and what its kernel computes after it.

    ``nodes`` are the folded graph's nodes the lowered op replaces (op first, ``end``
    last); ``residual`` is the other operand of the fused add (None without one);
    ``post_op``/``post_op_args`` name the fused activation in the kernels' terms.
    """

    op: fx.Node
    end: fx.Node
    nodes: tuple[fx.Node, ...]
    residual: fx.Node | None = None
    post_op: str = "none"
    post_op_args: tuple[float, ...] = ()


def only_user(node: fx.Node) -> fx.Node | None:
    """The one node reading ``node``, or None when none or several do."""
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _is_noop(node: fx.Node, gm: fx.GraphModule) -> bool:
    info = describe(node, gm)
    return info.kind is Kind.IDENTITY and not info.params.get("training", False) and len(info.inputs) >= 1


def _skip_noops(node: fx.Node, gm: fx.GraphModule, taken: list[fx.Node]) -> fx.Node:
    """Follow single-user eval-mode no-ops after ``node``; the last one reached."""
    while (user := only_user(node)) is not None and _is_noop(user, gm) and user.args[0] is node:
        taken.append(user)
        node = user
    return node


def post_op_of(info: OpInfo, table: dict[str, int]) -> tuple[str, tuple[float, ...]] | None:
    """The kernel post-op (name, scalars) computing activation ``info``, if ``table`` has it."""
    op, p = info.op, info.params
    if op == "relu6":
        found: tuple[str, tuple[float, ...]] = ("hardtanh", (0.0, 6.0))
    elif op == "hardtanh":
        found = ("hardtanh", (float(p.get("min_val", -1.0)), float(p.get("max_val", 1.0))))
    elif op == "silu":
        found = ("swish", ())
    elif op == "gelu":
        found = ("gelu_tanh" if p.get("approximate", "none") == "tanh" else "gelu", ())
    elif op == "leaky_relu":
        found = ("leaky_relu", (float(p.get("negative_slope", 0.01)),))
    elif op in ("relu", "hardswish", "tanh"):
        found = (op, ())
    else:
        return None
    return found if found[0] in table else None


def residual_operand(add: fx.Node, value: fx.Node, gm: fx.GraphModule) -> fx.Node | None:
    """The other operand when ``add`` is ``value + other`` on same-shaped tensors (the fused
    ``sum``); observer placement asks the same question (:mod:`fxcompress.quant.placement`)."""
    info = describe(add, gm)
    if info.kind is not Kind.ELEMENTWISE or info.op != "add" or info.params.get("alpha", 1) != 1:
        return None
    if len(info.inputs) != 2 or not all(isinstance(i, fx.Node) for i in info.inputs):
        return None
    a, b = info.inputs
    other = b if a is value else a
    if other is value:
        return None
    shape = getattr(value.meta.get("tensor_meta"), "shape", None)
    return other if shape is not None and getattr(other.meta.get("tensor_meta"), "shape", None) == shape else None


def match_chain(info: OpInfo, gm: fx.GraphModule, *, allow_add: bool = True,
                approximate: bool = False) -> FusedChain:
    """The longest fusable chain after the 2-D conv or the linear ``info`` (without a
    residual add when ``allow_add`` is False; with approximated post-ops when ``approximate``)."""
    conv = info.kind is Kind.CONV
    fuses_sum = conv and info.params.get("spatial_dims") == 2  # the fused sum is a 2-D kernel
    taken = [info.node]
    end = _skip_noops(info.node, gm, taken)
    residual = None
    user = only_user(end)
    if fuses_sum and allow_add and user is not None and (residual := residual_operand(user, end, gm)) is not None:
        taken.append(user)
        end = _skip_noops(user, gm, taken)
        user = only_user(end)
    if residual is not None:
        table = {"relu": 0}
    elif conv:
        fused = CONV_POST_OPS_BY_DIMS[int(info.params.get("spatial_dims", 2))]
        table = {name: n for name, n in CONV_POST_OPS.items() if name in fused}
    else:
        table = LINEAR_POST_OPS
    if not approximate:
        table = {name: n for name, n in table.items() if name in EXACT_POST_OPS}
    post = None
    if user is not None and user.args and user.args[0] is end:
        act = describe(user, gm)
        post = post_op_of(act, table) if act.kind is Kind.ACTIVATION else None
    if post is not None:
        taken.append(user)  # type: ignore[arg-type]
        end = _skip_noops(user, gm, taken)  # type: ignore[arg-type]
    name, args = post if post is not None else ("none", ())
    return FusedChain(info.node, end, tuple(taken), residual, name, args)
