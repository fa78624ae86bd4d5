"""Importance criteria: one score per unit, aggregated over every member of its group.

A criterion scores each parameter that a unit indexes (a conv's output rows,
a consumer's input columns, BatchNorm's scale, ...) along its channel dim;
the scores of all members are summed per unit.  Built in:

``l1``        sum of |w| over every member slice;
``l2``        sqrt of the sum of w² over every member slice;
``taylor``    sum of |w · ∂L/∂w| accumulated over the calibration batches with
              ``loss_fn`` (first-order Taylor estimate of the loss change);
``activation`` a consumer's input column ``j`` scores ``|W[:, j]|_2 · |x_j|_2``, where
              ``|x_j|`` is the norm of the activations on channel ``j`` over the
              calibration batches (Wanda-style: a channel matters by how much it
              adds to what its consumers compute, not by its weights alone); the
              rows of producers and norms score 0, and units no consumer of the
              data reached fall back to ``l2``.  For a dict batch with an
              ``attention_mask`` only the real tokens count (padding never does);
``bn_scale``  |γ| of the norms in the unit; units without a norm fall back to ``l2``;
``random``    seeded uniform noise (a baseline).

A custom criterion is a plain function ``fn(tensor, dim) -> scores`` that
returns one non-negative score per index of ``tensor`` along ``dim``; it is
called for every member parameter and summed per unit.  It is called on the
tensors of the graph being pruned (fxcompress's copy of the model), so a
function that looks tensors up by identity finds nothing: a function that
scores every channel 0 ranks nothing and is a :class:`ConfigError`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Union

import torch
from torch import fx, nn

from ..attention_mask import token_mask
from ..errors import ConfigError, InputError
from .types import ChannelGraph, Space

__all__ = ["Criterion", "CRITERIA", "DATA_FREE_CRITERIA", "unit_scores", "taylor_terms", "activation_terms"]

Criterion = Union[str, Callable[[torch.Tensor, int], torch.Tensor]]
CRITERIA = ("l1", "l2", "taylor", "activation", "bn_scale", "random")
#: The criteria that need no calibration data or loss (the ones the budget search can re-run at will).
DATA_FREE_CRITERIA = ("l1", "l2", "bn_scale", "random")


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
                taylor: dict[int, torch.Tensor] | None = None,
                activation: tuple[torch.Tensor, torch.Tensor] | None = None, seed: int = 0) -> torch.Tensor:
    """One score per unit of ``cg`` (higher = more important).

    ``taylor``: :func:`taylor_terms` of the graph; ``activation``: :func:`activation_terms`
    of the graph and ``cg``; each needed by its criterion only.
    """
    n_atoms = cg.unit_of.numel()
    if criterion == "random":
        return torch.rand(cg.n_units, generator=torch.Generator().manual_seed(seed))
    atom = torch.zeros(n_atoms, dtype=torch.float64)
    if criterion == "taylor":
        if taylor is None:
            raise ConfigError("taylor importance needs taylor_terms(): give loss_fn and calibration_data")
    if criterion == "activation":
        if activation is None:
            raise ConfigError("activation importance needs activation_terms(): give calibration_data")
        energy, reached = activation
        covered = torch.zeros(n_atoms, dtype=torch.bool)
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
        elif criterion == "activation":
            if ps.role != "in":  # the consumer's view decides: producers' rows and norms add nothing
                continue
            s = _reduce(t, ps.dim, torch.square).sqrt() * energy[ps.ids].sqrt()
            covered[ps.ids] |= reached[ps.ids]
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
    if callable(criterion) and not bool(atom.any()):
        raise ConfigError(f"custom importance {getattr(criterion, '__name__', criterion)!r} scored every channel 0, "
                          f"so it ranks nothing (the channels removed would be arbitrary); it is called with the "
                          f"tensors of fxcompress's copy of the model, so look tensors up by value, not identity")
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
    if criterion == "activation":
        unreached = torch.zeros(cg.n_units, dtype=torch.long).index_add_(0, cg.unit_of, covered.long()) == 0
        if unreached.any():
            units[unreached] = unit_scores(gm, cg, "l2")[unreached]
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


class _ConsumerInputs(fx.Interpreter):
    """Runs the graph and hands the input of every watched node to ``record`` as it is consumed,
    once per tensor (q, k and v reading one tensor count it once)."""

    def __init__(self, gm: fx.GraphModule, watched: dict[str, fx.Node],
                 record: Callable[[fx.Node, torch.Tensor], None]) -> None:
        super().__init__(gm)
        self.watched, self.record, self.seen = watched, record, set()

    def run_node(self, n: fx.Node) -> Any:
        source = self.watched.get(n.name)
        if source is not None and source not in self.seen and isinstance(self.env.get(source), torch.Tensor):
            self.seen.add(source)
            self.record(source, self.env[source])
        return super().run_node(n)


def activation_terms(gm: fx.GraphModule, cg: ChannelGraph, data: Iterable | None, example_args: tuple,
                     example_kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per atom of ``cg``: the sum of squared activations on it at the consumers' inputs, and whether any was seen.

    Every consumer (a node with an ``"in"`` parameter slice: a linear's or conv's input
    columns) has its first input recorded over the calibration batches (read as
    ``calibrate`` reads them); the channel positions of that input's space are summed
    over every other position.  For a dict batch with an ``attention_mask``, a
    channels-last input whose leading dims hold as many positions as the mask counts
    only the tokens the mask marks.  The graph is run, never changed.
    """
    from ..quant.calibration import batch_inputs
    from ..shapes import bind_placeholders

    if data is None:
        raise ConfigError("importance='activation' needs calibration_data (representative inputs); pass it to "
                          "fxcompress.run or choose importance='l2'")
    nodes = {n.name: n for n in gm.graph.nodes}
    watched = {ps.node: nodes[ps.node].args[0] for ps in cg.params.values()
               if ps.role == "in" and ps.node in nodes and nodes[ps.node].args
               and isinstance(nodes[ps.node].args[0], fx.Node)}
    n_atoms = cg.unit_of.numel()
    energy = torch.zeros(n_atoms, dtype=torch.float64)
    reached = torch.zeros(n_atoms, dtype=torch.bool)
    state: dict[str, Any] = {}

    def record(source: fx.Node, x: torch.Tensor) -> None:
        space = cg.spaces.get(source)
        if not isinstance(space, Space) or len(space.dims) != 1 or not x.is_floating_point():
            return
        d = space.dims[0]
        if space.ids.numel() != x.shape[d]:
            return
        channels_last = d == x.dim() - 1
        x = x.detach().double().movedim(d, -1).reshape(-1, x.shape[d])
        keep = state["mask"]
        if keep is not None and channels_last and keep.numel() == x.shape[0]:  # tokens: padding never counts
            x = x[keep.reshape(-1).bool()]
        ids = space.ids.reshape(-1)
        energy.index_add_(0, ids, x.square().sum(0))
        reached[ids] = True

    was_training = gm.training
    gm.eval()
    batches = 0
    try:
        with torch.no_grad():
            for index, item in enumerate(data):
                args, kwargs = batch_inputs(item, index, example_args, example_kwargs)
                state["mask"] = token_mask(kwargs)
                _ConsumerInputs(gm, watched, record).run(*bind_placeholders(gm, args, kwargs))
                batches += 1
    finally:
        gm.train(was_training)
    if not batches:
        raise InputError("importance='activation': calibration_data is empty")
    return energy, reached
