"""Module swaps for the passes that need no activation qparams: dynamic and weight-only.

:func:`swap_linears` walks the graph's ``call_module`` nodes and replaces every plain
``nn.Linear`` and every ``nn.MultiheadAttention`` (whose projections symbolic tracing
never exposes) by the module a builder returns, or keeps it float with the builder's
reason; :func:`swap_embeddings` does the same for ``nn.Embedding``. It never edits a module
in place: replacements are new modules set at the same path, so the nodes, their metadata
and every other reference stay as they were.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Union

from torch import fx, nn

from fxcompress.errors import ConfigError
from fxcompress.ops import Kind, describe, describe_module
from fxcompress.ops.tables import module_rule
from fxcompress.pass_base import PassContext
from fxcompress.quant.lowered_attention import attention_support
from fxcompress.quant.lowered_base import BACKENDS, LoweredModule

__all__ = ["Built", "SwapResult", "swap_linears", "swap_embeddings", "check_backend_option", "resolve_backend"]

#: A builder's answer: the replacement module, or the reason the original stays float.
Built = Union[LoweredModule, str]


@dataclass
class SwapResult:
    """What :func:`swap_linears` did: counts, and a reason per node it left alone."""

    linear: int = 0
    attention: int = 0
    float_nodes: dict[str, str] = field(default_factory=dict)
    replaced: dict[str, LoweredModule] = field(default_factory=dict)  # node name -> module

    def stats(self) -> dict[str, Any]:
        return {"linear": self.linear, "attention": self.attention, "float_nodes": dict(self.float_nodes)}


def check_backend_option(option: str | None) -> None:
    """ConfigError (when the pass is built) for a ``backend`` option that names no backend."""
    if option is not None and option not in BACKENDS:
        raise ConfigError(f"backend must be one of {BACKENDS} or None (the run's "
                          f"backend), got {option!r}")


def resolve_backend(option: str | None, ctx: PassContext) -> str:
    """The backend a lowering pass uses: its own option, else the run's (``ctx.backend``)."""
    backend = ctx.backend if option is None else option
    if backend not in BACKENDS:
        source = "option backend" if option is not None else "fxcompress.run(backend=...)"
        raise ConfigError(f"{source} is {backend!r}; lowered modules run on one of "
                          f"{BACKENDS} ('reference' runs anywhere)")
    return backend


def swap_linears(gm: fx.GraphModule, ctx: PassContext, linear: Callable[[nn.Linear], Built],
                 attention: Callable[[nn.MultiheadAttention], Built]) -> SwapResult:
    """Replace in-scope ``nn.Linear`` / ``nn.MultiheadAttention`` leaves by what the builders return.

    A module called by several nodes is replaced once (all its calls then use the
    replacement). Linear layers applied functionally (``F.linear`` on graph constants)
    and modules that are not plain (:mod:`fxcompress.ops.plain`: their own ``forward``, hooks, a
    parametrized weight) stay float, with the reason recorded.
    """
    result = SwapResult()
    done: dict[str, Built] = {}
    for node in gm.graph.nodes:
        if not ctx.in_scope(node):
            continue
        if node.op != "call_module":
            if describe(node, gm).kind is Kind.LINEAR:
                result.float_nodes[node.name] = "functional linear (F.linear on graph values) is not replaced"
            continue
        target = str(node.target)
        module = gm.get_submodule(target)
        info = describe_module(module)
        if module_rule(module) is not None or info.family not in (Kind.LINEAR, Kind.ATTENTION):
            continue  # not torch's Linear or MultiheadAttention (a class of ours declares its own op)
        if target in done:
            built = done[target]
        elif info.not_plain is not None:
            built = done[target] = f"{info.not_plain.reason}: it is not what torch's class computes"
        elif info.kind is Kind.ATTENTION:
            reason = attention_support(module)
            built = done[target] = reason if reason is not None else attention(module)
        else:
            built = done[target] = linear(module)
        if isinstance(built, str):
            result.float_nodes[node.name] = built
            continue
        if gm.get_submodule(target) is module:  # not yet replaced (a module called twice)
            gm.set_submodule(target, built)
            if info.kind is Kind.ATTENTION:
                result.attention += 1
            else:
                result.linear += 1
        result.replaced[node.name] = built
    return result


def swap_embeddings(gm: fx.GraphModule, ctx: PassContext, build: Callable[[nn.Embedding], Built]) -> SwapResult:
    """Replace in-scope plain ``nn.Embedding`` leaves by what ``build`` returns (counted in ``linear``:
    a :class:`SwapResult` field shared with :func:`swap_linears`; the caller names it), or keep them
    float with the builder's reason, as :func:`swap_linears` does for linears."""
    result = SwapResult()
    done: dict[str, Built] = {}
    for node in gm.graph.find_nodes(op="call_module"):
        if not ctx.in_scope(node):
            continue
        target = str(node.target)
        module = gm.get_submodule(target)
        info = describe_module(module)
        if module_rule(module) is not None or info.family is not Kind.EMBEDDING:
            continue
        if target not in done:
            read = [str(n.target) for n in gm.graph.find_nodes(op="get_attr") if str(n.target).startswith(target + ".")]
            done[target] = (f"{info.not_plain.reason}: it is not what torch's class computes"
                            if info.not_plain is not None else
                            f"the graph also reads its table directly ({read[0]}: a tied weight)" if read else
                            build(module))
        built = done[target]
        if isinstance(built, str):
            result.float_nodes[node.name] = built
            continue
        if gm.get_submodule(target) is module:
            gm.set_submodule(target, built)
            result.linear += 1
        result.replaced[node.name] = built
    return result
