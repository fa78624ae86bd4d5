"""Graph invariants, per stage.  The manager runs them after every pass (``check="full"``).

A graph moves through stages: ``float`` → ``observed`` (observers inserted)
→ ``fake_quant`` → ``folded`` (integer weights) → ``lowered`` (integer
kernels).  The stage is read off the graph itself from the role that our
runtime modules declare with a class attribute ``fxc_role`` ("observer",
"fake_quant", "folded", "lowered"), so a pass never has to announce it and
the verifier cannot be lied to.

Each check returns a list of problems (strings naming the node); an empty list
means the invariant holds.  :func:`verify` raises nothing: the manager turns
problems into a :class:`~fxcompress.errors.PassError` naming the pass.

Calling the module itself, ``fxcompress.verify(path)``, checks an artifact
(:func:`fxcompress.artifact.verify`, also ``fxcompress.verify_artifact``).
"""

from __future__ import annotations

import sys
import types
from typing import Any, Callable, Iterable

import torch
from torch import fx, nn


__all__ = ["STAGES", "role_of", "stage_of", "verify", "register_check"]

STAGES = ("float", "observed", "fake_quant", "folded", "lowered")
_ROLE_STAGE = {"observer": "observed", "fake_quant": "fake_quant", "folded": "folded", "lowered": "lowered"}

Check = Callable[[fx.GraphModule, str], list[str]]
_checks: list[Check] = []


def register_check(check: Check) -> Check:
    """Add an invariant ``check(gm, stage) -> problems`` (usable as a decorator)."""
    _checks.append(check)
    return check


def role_of(module: nn.Module) -> str | None:
    """The runtime role a module declares (``fxc_role``), or None for plain torch modules."""
    return getattr(type(module), "fxc_role", None)


def _called_modules(gm: fx.GraphModule) -> Iterable[tuple[fx.Node, nn.Module]]:
    """``call_module`` nodes with their modules (missing targets are ``_targets_exist``'s report)."""
    for node in gm.graph.nodes:
        if node.op == "call_module":
            try:
                yield node, gm.get_submodule(str(node.target))
            except AttributeError:
                continue


def stage_of(gm: fx.GraphModule) -> str:
    """The latest stage any module in the graph belongs to ('float' if none)."""
    stage = "float"
    for _, module in _called_modules(gm):
        s = _ROLE_STAGE.get(role_of(module) or "", "float")
        if STAGES.index(s) > STAGES.index(stage):
            stage = s
    return stage


def verify(gm: fx.GraphModule) -> tuple[str, list[str]]:
    """Run every registered invariant; return ``(stage, problems)``."""
    stage = stage_of(gm)
    problems: list[str] = []
    for check in _checks:
        problems.extend(check(gm, stage))
    return stage, problems


@register_check
def _targets_exist(gm: fx.GraphModule, stage: str) -> list[str]:
    from .ops import attr_value  # on use: `import fxcompress` stays light (verify is imported eagerly)

    problems = []
    for node in gm.graph.nodes:
        if node.op in ("call_module", "get_attr"):
            try:
                attr_value(gm, str(node.target))
            except AttributeError:
                problems.append(f"node {node.name!r}: {node.op} target {node.target!r} does not exist")
    return problems


@register_check
def _no_leftovers_after_lowering(gm: fx.GraphModule, stage: str) -> list[str]:
    """A lowered graph holds no observer or fake-quant; a folded one no observer."""
    forbidden = {"lowered": ("observer", "fake_quant"), "folded": ("observer",)}.get(stage, ())
    return [
        f"node {node.name!r}: module {type(m).__name__} (role {role_of(m)}) is left in a {stage} graph"
        for node, m in _called_modules(gm)
        if role_of(m) in forbidden
    ]


@register_check
def _mutations_are_last_uses(gm: fx.GraphModule, stage: str) -> list[str]:
    """A node that writes into one of its inputs (``mutates_args`` on its module,
    e.g. oneDNN's fused residual ``sum``) must be that input's last reader:
    anything reading the tensor afterwards would see the overwritten values.
    The input must also be computed by the graph: overwriting a placeholder
    or a ``get_attr`` would change the caller's input or the model's state."""
    order: dict[fx.Node, int] | None = None
    problems = []
    for node, module in _called_modules(gm):
        for index in getattr(module, "mutates_args", ()):
            if index >= len(node.args) or not isinstance(node.args[index], fx.Node):
                continue
            victim = node.args[index]
            if victim.op in ("placeholder", "get_attr"):
                problems.append(f"node {node.name!r} overwrites {victim.op} {victim.name!r} in place")
                continue
            if order is None:  # built once, and only for graphs that have mutating modules
                order = {n: i for i, n in enumerate(gm.graph.nodes)}
            late = [u.name for u in victim.users if u is not node and order[u] > order[node]]
            if late:
                problems.append(
                    f"node {node.name!r} overwrites {victim.name!r} in place, which is still read by {late}"
                )
    return problems


@register_check
def _parameters_are_finite(gm: fx.GraphModule, stage: str) -> list[str]:
    """Parameters hold no NaN or Inf, buffers no NaN (-inf is a legitimate attention-mask value);
    run() refuses a model that breaks this, so a pass that breaks it is named."""
    problems = []
    params = {id(p) for p in gm.parameters()}
    for name, tensor in gm.state_dict(keep_vars=True).items():
        if not (isinstance(tensor, torch.Tensor) and tensor.is_floating_point()):
            continue
        if id(tensor) in params and not torch.isfinite(tensor).all():
            problems.append(f"state {name!r} holds NaN or Inf")
        elif id(tensor) not in params and torch.isnan(tensor).any():
            problems.append(f"state {name!r} holds NaN")
    return problems


class _CallableModule(types.ModuleType):
    """``fxcompress.verify`` is this module; calling it checks an artifact.

    Earlier versions exported the artifact check as ``fxcompress.verify``,
    which hid this module; both spellings keep working.
    """

    def __call__(self, path: Any, *, public_key: Any = None) -> dict:
        from .artifact import verify as verify_artifact  # imported on use: the artifact code is not light

        return verify_artifact(path, public_key=public_key)


sys.modules[__name__].__class__ = _CallableModule
