"""The x86 fusion patterns: what oneDNN computes in one kernel after a conv or linear.

Two passes must agree on these chains: ``insert_observers`` observes a quantized op's
output where its chain ends (:mod:`fxcompress.quant.placement`), and ``lower`` replaces
each chain by one kernel call that requantizes there (:mod:`fxcompress.quant.lowering`).
Both match them with :func:`match_chain`, in one vocabulary, the kernels' own
(:mod:`fxcompress.quant.kernels`):

* the **op**: a conv or a linear;
* then, for a 2-D conv that is not transposed, a **residual add** of a same-shaped float
  tensor (oneDNN's ``sum`` post-op; the 1-D and 3-D int8 convs have none, their add runs
  in float);
* then one **unary post-op** the kernel fuses (:func:`fusable_post_ops`): for a 2-D conv
  relu, relu6/hardtanh, hardswish, silu; for a 1-D conv relu; for a 3-D conv none; for a
  linear also gelu, tanh and leaky_relu; after a residual add only relu.

Every node of a chain but its end must have one user: its value disappears.

**Eval-mode no-ops** (dropout, identity, torchvision's stochastic depth;
:func:`is_eval_noop`) compute nothing at inference; ``through_noops=True`` looks through
them, so EfficientNet's ``conv -> stochastic_depth -> add`` fuses like ResNet's
``conv -> add``. Lowering looks through them; observer placement does not (it matches the
chain as written, and ``eliminate_dead_nodes`` before ``insert_observers`` removes them),
but for the separate residual adds of ``residual_adds="separate"``, which fuse nothing.
The two still agree: a chain placement matched is a prefix of the one lowering matches,
and lowering fuses a residual add only where the residual holds integer codes, else it
drops the add from the chain (:meth:`~fxcompress.quant.lowering.static.StaticLowering.plan`).

ReLU, ReLU6/hardtanh and leaky ReLU (comparisons and one multiply) the kernels compute
exactly as torch does (:data:`EXACT_POST_OPS`). oneDNN evaluates SiLU, hardswish, GELU
and tanh with its own approximations, a float32 ulp or so away from torch's, which moves
a requantized code now and then (within the per-op contract, :mod:`fxcompress.quant.contract`);
they are fused only with ``approximate=True``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection

import torch
from torch import fx

from fxcompress.ops import Kind, OpInfo, describe
from fxcompress.quant.kernels import CONV_POST_OPS, CONV_POST_OPS_BY_DIMS, LINEAR_POST_OPS, POST_OPS

__all__ = [
    "FusedChain", "EXACT_POST_OPS", "match_chain", "fusable_post_ops", "post_op_of", "residual_operand",
    "is_eval_noop", "only_user", "is_float_value", "TABLE_ACTIVATIONS",
]

#: Kernel post-ops whose oneDNN arithmetic equals torch's bit for bit.
EXACT_POST_OPS = ("relu", "hardtanh", "leaky_relu")
# After a fused residual sum the kernel applies at most a ReLU.
_AFTER_SUM = {"relu": 0}


@dataclass(frozen=True)
class FusedChain:
    """A conv or linear and what its kernel computes after it.

    ``nodes`` are the graph's nodes the lowered op replaces (op first, ``end`` last);
    ``data`` is the op's activation input (None for an embedding, whose input is
    indices); ``add`` the fused residual add and ``residual`` its other operand (None
    without one); ``post_op``/``post_op_args`` name the fused activation in the
    kernels' terms. ``standalone`` marks a chain that is no conv or linear but computes on
    codes on its own (a separate residual add, an activation table: :mod:`.placement`).
    """

    op: fx.Node
    end: fx.Node
    nodes: tuple[fx.Node, ...]
    data: fx.Node | None = None
    add: fx.Node | None = None
    residual: fx.Node | None = None
    post_op: str = "none"
    post_op_args: tuple[float, ...] = ()
    standalone: bool = False


def only_user(node: fx.Node) -> fx.Node | None:
    """The one node reading ``node``, or None when none or several do."""
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def is_float_value(node: object) -> bool:
    """Whether a node computes one floating-point tensor (from its ``tensor_meta``)."""
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    dtype = getattr(meta, "dtype", None)
    return isinstance(dtype, torch.dtype) and dtype.is_floating_point


def is_eval_noop(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether ``node`` returns its first input unchanged at inference (eval-mode dropout,
    identity, stochastic depth, contiguous, clone: :attr:`~fxcompress.ops.OpInfo.is_noop`)."""
    info = describe(node, gm)
    return info.is_noop and len(info.inputs) >= 1


def _skip_noops(node: fx.Node, gm: fx.GraphModule, taken: list[fx.Node]) -> fx.Node:
    """Follow single-user eval-mode no-ops after ``node``; the last one reached."""
    while (user := only_user(node)) is not None and is_eval_noop(user, gm) and user.args[0] is node:
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
    elif op in ("relu", "hardswish", "tanh", "sigmoid"):
        found = (op, ())
    else:
        return None
    return found if found[0] in table else None


#: The activations a uint8 table computes (:class:`~fxcompress.quant.lowered.QuantTable`):
#: every kernel post-op, and sigmoid, which no kernel fuses.
TABLE_ACTIVATIONS: dict[str, int] = {**POST_OPS, "sigmoid": 0}


def fusable_post_ops(info: OpInfo, *, approximate: bool = True) -> dict[str, int]:
    """The kernel post-ops (name -> number of scalars) the int8 kernel of conv or linear
    ``info`` fuses; only :data:`EXACT_POST_OPS` unless ``approximate``."""
    if info.kind is Kind.CONV:
        fused = CONV_POST_OPS_BY_DIMS[int(info.params.get("spatial_dims", 2))]
        table = {name: n for name, n in CONV_POST_OPS.items() if name in fused}
    else:
        table = dict(LINEAR_POST_OPS)
    return table if approximate else {name: n for name, n in table.items() if name in EXACT_POST_OPS}


def fuses_residual_sum(info: OpInfo) -> bool:
    """Whether the int8 kernel of ``info`` fuses a residual add (a 2-D, not transposed conv)."""
    return info.kind is Kind.CONV and info.params.get("spatial_dims") == 2 and not info.transposed


def residual_operand(add: fx.Node, value: fx.Node, gm: fx.GraphModule) -> fx.Node | None:
    """The other operand when ``add`` is ``value + other`` on same-shaped float tensors (the
    fused ``sum``), else None."""
    info = describe(add, gm)
    if info.kind is not Kind.ELEMENTWISE or info.op != "add" or info.params.get("alpha", 1) != 1:
        return None
    if len(info.inputs) != 2 or not all(isinstance(i, fx.Node) for i in info.inputs):
        return None
    a, b = info.inputs
    other = b if a is value else a
    if other is value or not is_float_value(other):
        return None
    shape = getattr(value.meta.get("tensor_meta"), "shape", None)
    return other if shape is not None and getattr(other.meta.get("tensor_meta"), "shape", None) == shape else None


def match_chain(info: OpInfo, gm: fx.GraphModule, *, through_noops: bool, allow_add: bool = True,
                approximate: bool = True, post_ops: Collection[str] | None = None) -> FusedChain:
    """The longest fusable chain after the conv or linear ``info`` (see the module docstring):
    looking through eval-mode no-ops when ``through_noops``, without a residual add when
    ``allow_add`` is False, with approximated post-ops when ``approximate``, and only the
    post-ops in ``post_ops`` when given."""
    data = info.inputs[0] if info.inputs and isinstance(info.inputs[0], fx.Node) else None
    taken = [info.node]

    def skip(node: fx.Node) -> fx.Node:
        return _skip_noops(node, gm, taken) if through_noops else node

    end = skip(info.node)
    add = residual = None
    user = only_user(end)
    if fuses_residual_sum(info) and allow_add and user is not None \
            and (residual := residual_operand(user, end, gm)) is not None:
        add = user
        taken.append(add)
        end = skip(add)
        user = only_user(end)
    table = _AFTER_SUM if residual is not None else fusable_post_ops(info, approximate=approximate)
    if post_ops is not None:
        table = {name: n for name, n in table.items() if name in post_ops}
    post = None
    if user is not None and user.args and user.args[0] is end:
        act = describe(user, gm)
        post = post_op_of(act, table) if act.kind is Kind.ACTIVATION else None
    if post is not None:
        taken.append(user)  # type: ignore[arg-type]
        end = skip(user)  # type: ignore[arg-type]
    name, args = post if post is not None else ("none", ())
    return FusedChain(info.node, end, tuple(taken), data, add, residual, name, args)
