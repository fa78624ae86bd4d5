"""Importance criteria: one score per unit, aggregated over every member of its group.

A criterion scores each parameter that a unit indexes (a conv's output rows,
a consumer's input columns, BatchNorm's scale, ...) along its channel dim;
the scores of all members are summed per unit.  Built in:

``l1``        sum of |w| over every member slice;
``l2``        sqrt of the sum of w² over every member slice;
``taylor``    sum of |w · ∂L/∂w| accumulated over the calibration batches with
              ``loss_fn`` (first-order Taylor estimate of the loss change);
``bn_scale``  |γ| of the norms in the unit; units without a norm fall back to ``l2``;
``random``    seeded uniform noise (a baseline).

A custom criterion is a plain function ``fn(tensor, dim) -> scores`` that
returns one non-negative score per index of ``tensor`` along ``dim``; it is
called for every member parameter and summed per unit.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Union

import torch
from torch import fx, nn

from ..errors import ConfigError, InputError
from .types import ChannelGraph

__all__ = ["Criterion", "CRITERIA", "unit_scores", "taylor_terms"]

Criterion = Union[str, Callable[[torch.Tensor, int], torch.Tensor]]
CRITERIA = ("l1", "l2", "taylor", "bn_scale", "random")


def _reduce(t: torch.Tensor, dim: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    moved = fn(t.detach().float()).movedim(dim, 0)
    return moved.reshape(moved.shape[0], -1).sum(dim=1)


def _member_tensors(gm: fx.GraphModule, cg: ChannelGraph) -> Iterable[tuple[Any, torch.Tensor]]:
    """(ParamSlice, tensor) for every member that is a floating-point parameter."""
    for ps in cg.params.values():
        owner = gm.get_submodule(ps.owner)
        t = getattr(owner, ps.attr, None)
        if isinstance(t, nn.Parameter) and t.is_floating_point():
            yield ps, t


def unit_scores(gm: fx.GraphModule, cg: ChannelGraph, criterion: Criterion, *,
                taylor: dict[int, torch.Tensor] | None = None, seed: int = 0) -> torch.Tensor:
    """One score per unit of ``cg`` (higher = more important)."""
    n_atoms = cg.unit_of.numel()
    if criterion == "random":
        return torch.rand(cg.n_units, generator=torch.Generator().manual_seed(seed))
    atom = torch.zeros(n_atoms, dtype=torch.float64)
    if criterion == "taylor":
        if taylor is None:
            raise ConfigError("taylor importance needs taylor_terms(): give loss_fn and calibration_data")
    for ps, t in _member_tensors(gm, cg):
        if criterion == "l1":
            s = _reduce(t, ps.dim, torch.abs)
        elif criterion == "l2":
            s = _reduce(t, ps.dim, torch.square)
        elif criterion == "taylor":
            g = taylor.get(id(t))
            if g is None:
                continue
            s = _reduce(g, ps.dim, torch.abs)
        elif criterion == "bn_scale":
            if ps.role != "norm" or ps.attr != "weight":
                continue
            s = _reduce(t, ps.dim, torch.abs)
        elif callable(criterion):
            s = torch.as_tensor(criterion(t.detach(), ps.dim)).reshape(-1).double()
            if s.numel() != t.shape[ps.dim]:
                raise ConfigError(f"custom importance returned {s.numel()} scores for {ps.owner}.{ps.attr} "
                                  f"along dim {ps.dim} (size {t.shape[ps.dim]}); return one per index")
            if not bool(torch.isfinite(s).all()):  # NaN would rank channels arbitrarily, silently
                raise ConfigError(f"custom importance {getattr(criterion, '__name__', criterion)!r} returned "
                                  f"{int((~torch.isfinite(s)).sum())} NaN/Inf scores for {ps.owner}.{ps.attr} "
                                  f"along dim {ps.dim}; return finite scores")
        else:
            raise ConfigError(f"unknown importance {criterion!r}; choose one of {CRITERIA} or pass a function")
        atom.index_add_(0, ps.ids, s.double())
    units = torch.zeros(cg.n_units, dtype=torch.float64).index_add_(0, cg.unit_of, atom)
    if not bool(torch.isfinite(units).all()):  # gradients (taylor) can overflow: never rank on NaN
        raise InputError(f"importance {criterion if isinstance(criterion, str) else 'function'!r} gave NaN/Inf "
                         f"scores to {int((~torch.isfinite(units)).sum())} channel units; check the loss and data")
    if criterion == "l2":
        units = units.sqrt()
    if criterion == "bn_scale":
        no_norm = units == 0
        if no_norm.any():
            units[no_norm] = unit_scores(gm, cg, "l2")[no_norm]
    return units


def taylor_terms(gm: fx.GraphModule, data: Iterable | None,
                     loss_fn: Callable[[Any, Any], torch.Tensor] | None) -> dict[int, torch.Tensor]:
    """Per parameter (by ``id``), ``|w · ∂L/∂w|`` summed over the calibration batches.

    Batches are ``(inputs, target)`` pairs as in :func:`fxcompress.finetune`.
    The graph's parameters are left exactly as they were (``.grad`` cleared).
    """
    from ..train import call_with, split_batch

    if loss_fn is None or data is None:
        raise ConfigError("importance='taylor' needs loss_fn and calibration_data (batches of (inputs, target)); "
                          "pass them to fxcompress.run or choose importance='l2'")
    params = [p for p in gm.parameters() if p.is_floating_point()]
    flags = [p.requires_grad for p in params]
    grads: dict[int, torch.Tensor] = {}
    was_training = gm.training
    gm.eval()  # eval: BatchNorm statistics must not move while we measure
    try:
        for p in params:
            p.requires_grad_(True)
        batches = 0
        for batch in data:
            inputs, target = split_batch(batch)
            gm.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss = loss_fn(call_with(gm, inputs), target)
                loss.backward()
            for p in params:
                if p.grad is not None:  # first-order Taylor term of this batch, per weight
                    term = (p.detach() * p.grad.detach()).abs()
                    grads[id(p)] = grads[id(p)] + term if id(p) in grads else term
            batches += 1
        if not batches:
            raise InputError("importance='taylor': calibration_data is empty")
    finally:
        gm.zero_grad(set_to_none=True)
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        gm.train(was_training)
    return grads
