"""Module swaps for the passes that need no activation qparams: dynamic and weight-only.

:func:`swap_linears` walks the graph's ``call_module`` nodes and replaces every plain
``nn.Linear`` and every ``nn.MultiheadAttention`` (whose projections symbolic tracing
never exposes) by the module a builder returns, or keeps it float with the builder's
reason. It never edits a module in place: replacements are new modules set at the same
path, so the nodes, their metadata and every other reference stay as they were.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Union

from torch import fx, nn

from fxcompress.errors import ConfigError
from fxcompress.ops import Kind, describe
from fxcompress.pass_base import PassContext
from fxcompress.quant.lowered_attention import attention_support
from fxcompress.quant.lowered_base import BACKENDS, LoweredModule

__all__ = ["Built", "SwapResult", "swap_linears", "check_backend_option", "resolve_backend", "set_submodule",
           "is_plain"]

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


def check_backend_option(pass_name: str, option: str | None) -> None:
    """ConfigError (when the pass is built) for a ``backend`` option that names no backend."""
    if option is not None and option not in BACKENDS:
        raise ConfigError(f"pass {pass_name!r}: backend must be one of {BACKENDS} or None (the run's "
                          f"backend), got {option!r}")


def resolve_backend(option: str | None, ctx: PassContext, pass_name: str) -> str:
    """The backend a lowering pass uses: its own option, else the run's (``ctx.backend``)."""
    backend = ctx.backend if option is None else option
    if backend not in BACKENDS:
        source = "option backend" if option is not None else "fxcompress.run(backend=...)"
        raise ConfigError(f"pass {pass_name!r}: {source} is {backend!r}; lowered modules run on one of "
                          f"{BACKENDS} ('reference' runs anywhere)")
    return backend


def is_plain(module: nn.Module, cls: type) -> bool:
    """``module`` computes what torch's ``cls`` computes: same forward, no hooks."""
    return (isinstance(module, cls) and type(module).forward is cls.forward
            and not (module._forward_hooks or module._forward_pre_hooks))


def set_submodule(gm: fx.GraphModule, path: str, module: nn.Module) -> None:
    """Put ``module`` at ``path`` (which exists), replacing what was there."""
    owner, _, name = path.rpartition(".")
    setattr(gm.get_submodule(owner), name, module)


def swap_linears(gm: fx.GraphModule, ctx: PassContext, linear: Callable[[nn.Linear], Built],
                 attention: Callable[[nn.MultiheadAttention], Built]) -> SwapResult:
    """Replace in-scope ``nn.Linear`` / ``nn.MultiheadAttention`` leaves by what the builders return.

    A module called by several nodes is replaced once (all its calls then use the
    replacement). Linear layers applied functionally (``F.linear`` on graph constants)
    and subclasses with their own ``forward`` stay float, with the reason recorded.
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
        if target in done:
            built = done[target]
        elif isinstance(module, nn.MultiheadAttention):
            reason = attention_support(module)
            if not is_plain(module, nn.MultiheadAttention):
                reason = f"{type(module).__name__} overrides nn.MultiheadAttention's forward or has hooks"
            built = done[target] = reason if reason is not None else attention(module)
        elif isinstance(module, nn.Linear):
            plain = is_plain(module, nn.Linear)
            built = done[target] = linear(module) if plain else \
                f"{type(module).__name__} overrides nn.Linear's forward or has hooks"
        else:
            continue
        if isinstance(built, str):
            result.float_nodes[node.name] = built
            continue
        if gm.get_submodule(target) is module:  # not yet replaced (a module called twice)
            set_submodule(gm, target, built)
            if isinstance(module, nn.MultiheadAttention):
                result.attention += 1
            else:
                result.linear += 1
        result.replaced[node.name] = built
    return result
