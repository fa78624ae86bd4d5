"""Post-pruning reconstruction: refit the consumers of removed channels by least squares.

After ``prune_channels`` removes heads or MLP channels, each *consumer* linear (an attention
output projection, an MLP's second layer) sees fewer inputs.  :func:`reconstruct_consumers`
refits such a layer's weight and bias so that, on calibration data, ``W' x_kept + b'``
reproduces what the *original* layer computed, ``W x + b`` (Kwon et al. 2022, "A Fast
Post-Training Pruning Framework for Transformers"; FLAP's bias compensation is the bias term).

Layers are refitted one at a time in the order the original model calls them, each on the
inputs the *already refitted* pruned model gives it, so a layer also compensates the errors of
the layers before it.  Each fit is a ridge regression towards the sliced weight, solved from
float64 normal equations::

    [W' b'] = argmin  sum_tokens |W' x + b' - y|^2  +  lambda * |W' - W_sliced|^2

with ``lambda = ridge * mean(diag(X^T X))`` (scale-free).  Only the layers' weights and biases
change; shapes, the graph and the original model stay as they were.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import nn

from ..attention_mask import token_mask as batch_token_mask
from ..errors import ConfigError, InputError

__all__ = ["reconstruct_consumers", "pruned_consumers"]


def pruned_consumers(pruned: nn.Module, original: nn.Module) -> list[str]:
    """Module paths of the ``nn.Linear`` layers whose inputs pruning narrowed (same outputs, fewer inputs)."""
    originals = dict(original.named_modules())
    out = []
    for path, m in pruned.named_modules():
        o = originals.get(path)
        if isinstance(m, nn.Linear) and isinstance(o, nn.Linear) \
                and m.in_features < o.in_features and m.out_features == o.out_features:
            out.append(path)
    return out


def _call(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _rows(x: torch.Tensor, keep: Optional[torch.Tensor], path: str) -> torch.Tensor:
    """``x`` as (tokens, features) in float64, only the rows ``keep`` marks (real tokens, not padding)."""
    lead = x.shape[:-1].numel()
    x = x.detach().reshape(lead, x.shape[-1]).double()
    if keep is None:
        return x
    if keep.numel() != lead:
        raise InputError(f"reconstruct_consumers: the token mask of a batch has {keep.numel()} entries but "
                         f"{path} sees {lead} tokens; give a token_mask that matches the layer's leading dims")
    return x[keep.reshape(-1).bool()]


def reconstruct_consumers(
    pruned: nn.Module,
    original: nn.Module,
    data: Iterable,
    *,
    modules: Optional[Sequence[str]] = None,
    ridge: float = 1e-3,
    token_mask: Optional[Callable[[Any], Optional[torch.Tensor]]] = None,
) -> nn.Module:
    """A copy of ``pruned`` whose narrowed consumer linears are refitted to the ``original``'s outputs.

    ``data``: batches the models are called with (a tensor, a tuple of positional inputs or a
    dict of keyword inputs), iterated once per refitted layer; calibration data, never the data
    the result is evaluated on.  ``modules``: the paths to refit (default
    :func:`pruned_consumers`: every ``nn.Linear`` with fewer inputs than the original's layer of
    the same path).  ``token_mask(batch)``: a tensor marking the tokens (rows of the layers'
    leading dims) to fit on, or None for all; by default a dict batch's ``attention_mask`` is
    used when it has one, so padding never enters the fit.

    Guarantees: ``pruned`` and ``original`` are not changed; the result has the same graph,
    modules and shapes as ``pruned``, only the refitted layers' weights and biases differ.
    Raises :class:`ConfigError` for a bad ``ridge`` or a path that is not a narrowed linear, or
    when there is nothing to refit, and :class:`InputError` for empty data or a layer the data
    never reaches.
    """
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge > 0:
        raise ConfigError(f"reconstruct_consumers: ridge must be a positive number, got {ridge!r}")
    paths = list(pruned_consumers(pruned, original) if modules is None else modules)
    if not paths:
        raise ConfigError("reconstruct_consumers: no nn.Linear of the pruned model has fewer inputs than the "
                          "original's layer of the same path; prune first (prune_channels), or name modules=")
    originals, prunes = dict(original.named_modules()), dict(pruned.named_modules())
    for p in paths:
        o, m = originals.get(p), prunes.get(p)
        if not (isinstance(o, nn.Linear) and isinstance(m, nn.Linear) and o.out_features == m.out_features):
            raise ConfigError(f"reconstruct_consumers: {p!r} must name an nn.Linear in both models with the same "
                              f"out_features (original: {type(o).__name__}, pruned: {type(m).__name__})")
    batches = list(data)
    if not batches:
        raise InputError("reconstruct_consumers: the calibration data is empty")
    if token_mask is None:
        token_mask = batch_token_mask

    result = copy.deepcopy(pruned)
    layers = dict(result.named_modules())
    targets, order = _original_outputs(original, batches, paths, token_mask)
    missing = [p for p in paths if p not in order]
    if missing:
        raise InputError(f"reconstruct_consumers: the data never reaches {missing} of the original model")
    for path in sorted(paths, key=order.index):
        _refit(result, layers[path], path, batches, targets[path], token_mask, ridge)
    return result


def _original_outputs(original: nn.Module, batches: list, paths: list[str],
                      token_mask: Callable) -> tuple[dict[str, list[torch.Tensor]], list[str]]:
    """Every target layer's outputs on every batch (real tokens only), and the order layers are first called."""
    targets: dict[str, list[torch.Tensor]] = {p: [] for p in paths}
    order: list[str] = []
    keep: dict[str, Any] = {}
    hooks = []
    for p in paths:
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor, p: str = p) -> None:
            if p not in order:
                order.append(p)
            targets[p].append(_rows(output, keep["mask"], p))
        hooks.append(original.get_submodule(p).register_forward_hook(hook))
    was_training = original.training
    original.eval()
    try:
        with torch.no_grad():
            for b in batches:
                keep["mask"] = token_mask(b)
                _call(original, b)
    finally:
        original.train(was_training)
        for h in hooks:
            h.remove()
    return targets, order


def _refit(model: nn.Module, layer: nn.Linear, path: str, batches: list, targets: list[torch.Tensor],
           token_mask: Callable, ridge: float) -> None:
    """Solve the ridge normal equations for one layer on the inputs the (partly refitted) model gives it."""
    k = layer.in_features + 1  # the inputs and a constant 1 for the bias
    gram = torch.zeros(k, k, dtype=torch.float64)
    cross = torch.zeros(k, layer.out_features, dtype=torch.float64)
    state: dict[str, Any] = {}

    def hook(module: nn.Module, inputs: tuple) -> None:
        x = _rows(inputs[0], state["mask"], path)
        y = targets[state["i"]]
        if x.shape[0] != y.shape[0]:
            raise InputError(f"reconstruct_consumers: {path} sees {x.shape[0]} tokens in batch {state['i']} "
                             f"but the original layer saw {y.shape[0]}; the models must take the same inputs")
        x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
        gram.add_(x.T @ x)
        cross.add_(x.T @ y)
        state["calls"] += 1

    handle = layer.register_forward_pre_hook(hook)
    was_training = model.training
    model.eval()
    state["calls"] = 0
    try:
        with torch.no_grad():
            for i, b in enumerate(batches):
                state["i"], state["mask"] = i, token_mask(b)
                _call(model, b)
    finally:
        handle.remove()
        model.train(was_training)
    if state["calls"] != len(batches):
        raise InputError(f"reconstruct_consumers: {path} ran {state['calls']} times over {len(batches)} batches; "
                         f"only layers called once per forward can be refitted")
    w0 = layer.weight.detach().double()
    b0 = layer.bias.detach().double() if layer.bias is not None else torch.zeros(layer.out_features,
                                                                                 dtype=torch.float64)
    if layer.bias is None:  # no bias to refit: drop the constant column
        gram, cross = gram[:-1, :-1], cross[:-1]
    lam = ridge * gram.diagonal()[:layer.in_features].mean().clamp_min(1e-12)
    prior = torch.cat([w0.T, b0[None]], dim=0)[:gram.shape[0]]
    reg = torch.full((gram.shape[0],), float(lam), dtype=torch.float64)
    if layer.bias is not None:
        reg[-1] = 0.0  # the bias is not shrunk: it absorbs the removed channels' mean contribution
    solution = torch.linalg.solve(gram + torch.diag(reg), cross + reg[:, None] * prior)
    with torch.no_grad():
        layer.weight.copy_(solution[:layer.in_features].T.to(layer.weight.dtype))
        if layer.bias is not None:
            layer.bias.copy_(solution[-1].to(layer.bias.dtype))
