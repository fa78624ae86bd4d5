"""Linear layers a module swap cannot reach: those inside modules the graph keeps whole.

Symbolic tracing keeps some modules as one node (``nn.TransformerEncoder``
cannot be traced into; ``leaf_modules`` keeps others whole). Their layers are
not graph nodes, so ``quantize_dynamic`` and ``quantize_weights`` leave them
float; :func:`float_leaves` names them for the pass's ``float_nodes`` stat,
so the report never counts them as done.
"""

from __future__ import annotations

from torch import fx, nn

from fxcompress.ops import layers_inside
from fxcompress.pass_base import PassContext
from fxcompress.verify import role_of

__all__ = ["float_leaves"]


def float_leaves(gm: fx.GraphModule, ctx: PassContext, seen: set[str]) -> dict[str, str]:
    """``{node: reason}`` for in-scope module calls (not in ``seen``) holding linear layers inside."""
    found = {}
    for node in gm.graph.find_nodes(op="call_module"):
        if node.name in seen or not ctx.in_scope(node):
            continue
        module = gm.get_submodule(str(node.target))
        if isinstance(module, (nn.Linear, nn.MultiheadAttention)) or role_of(module) is not None:
            continue
        inside = layers_inside(module, (nn.Linear, nn.MultiheadAttention))
        if inside:
            shown = ", ".join(inside[:3]) + (", ..." if len(inside) > 3 else "")
            found[node.name] = (f"{type(module).__name__} is kept whole (one graph node): its {len(inside)} "
                                f"linear layers inside ({shown}) stay float")
    return found
