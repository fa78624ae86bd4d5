"""Linear layers a module swap cannot reach: those inside modules the graph keeps whole.

Symbolic tracing keeps some modules as one node (``nn.TransformerEncoder``
cannot be traced into; ``leaf_modules`` keeps others whole). Their layers are
not graph nodes, so ``quantize_dynamic`` and ``quantize_weights`` leave them
float; :func:`float_leaves` names them for the pass's ``float_nodes`` stat,
so the report never counts them as done.
"""

from __future__ import annotations

from torch import fx

from fxcompress.ops import Kind, describe_module, layers_inside
from fxcompress.pass_base import PassContext
from fxcompress.verify import role_of

__all__ = ["float_leaves"]

# Linear layers, and attention (whose projections are linears).
_LINEAR_KINDS = (Kind.LINEAR, Kind.ATTENTION)


def float_leaves(gm: fx.GraphModule, ctx: PassContext, seen: set[str]) -> dict[str, str]:
    """``{node: reason}`` for in-scope module calls (not in ``seen``) holding linear layers inside."""
    found = {}
    for node in gm.graph.find_nodes(op="call_module"):
        if node.name in seen or not ctx.in_scope(node):
            continue
        module = gm.get_submodule(str(node.target))
        if describe_module(module).family in _LINEAR_KINDS or role_of(module) is not None:
            continue
        inside = layers_inside(module, _LINEAR_KINDS)
        if inside:
            shown = ", ".join(inside[:3]) + (", ..." if len(inside) > 3 else "")
            found[node.name] = (f"{type(module).__name__} is kept whole (one graph node): its {len(inside)} "
                                f"linear layers inside ({shown}) stay float")
    return found
