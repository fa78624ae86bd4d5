"""``smooth_quant``: migrate activation outliers into the weights of Linear layers (Xiao et al., SmoothQuant)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from fxcompress.capture import record_meta
from fxcompress.errors import ConfigError
from fxcompress.ops import Kind, describe
from fxcompress.pass_base import Pass, PassContext, PassResult
from fxcompress.quant.observers import make_observer
from fxcompress.quant.qparams import fake_quantize
from fxcompress.quant.spec import QuantSpec, default_activation_spec, default_weight_spec
from fxcompress.budget.measure import input_batches

__all__ = ["SmoothQuant"]

_SCALE_PREFIX = "fxc_smooth_"
_MIN = 1e-5


@dataclass(frozen=True)
class SmoothQuant(Pass):
    """Divides the input channels of every in-scope ``nn.Linear`` by a per-channel factor ``s``
    and multiplies the matching weight columns by it, so activation outliers move into the
    weights (which quantize per channel) and the per-tensor int8 activation range shrinks;
    outputs are unchanged in float.

    Linears reading the same value share one ``s``: ``s_j = max|X_j|^alpha /
    max|W_j|^(1-alpha)`` (``X`` the input on the calibration data, ``W`` their weights
    together), with ``alpha`` searched per group among ``alphas``, and no smoothing as a
    candidate too, for the smallest squared error of the int8 outputs (per-tensor affine
    activations, per-channel symmetric weights, as static int8 computes them) on up to
    ``max_rows`` recorded input rows.  The ``1/s`` goes into the LayerNorm before the
    group when the group alone reads it, else into a per-channel ``torch.mul`` by a
    buffer inserted before the group (post-LN transformers read their LayerNorm outputs
    in the residual too).  Run on the float graph before ``insert_observers``.  Stats:
    ``groups`` (seen), ``smoothed``, ``into_norm``, ``mul_nodes``, ``alpha`` (group ->
    chosen alpha, None when smoothing did not help).
    """

    name = "smooth_quant"
    exact = True
    eval_only = True

    alphas: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    num_batches: int | None = None
    max_rows: int = 4096

    def __post_init__(self) -> None:
        if not self.alphas or not all(isinstance(a, (int, float)) and not isinstance(a, bool) and 0 <= a <= 1
                                      for a in self.alphas):
            raise ConfigError(f"alphas must be a non-empty list of numbers in [0, 1], "
                              f"got {self.alphas!r}")
        if isinstance(self.max_rows, bool) or not isinstance(self.max_rows, int) or self.max_rows < 1:
            raise ConfigError(f"max_rows must be a positive int, got {self.max_rows!r}")

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        self.check_stage(gm, "smooth the float model, before insert_observers", ("float",))
        groups = _groups(gm, ctx)
        stats: dict[str, Any] = {"groups": len(groups), "smoothed": 0, "into_norm": 0, "mul_nodes": 0, "alpha": {}}
        if not groups:
            return PassResult(gm, False, stats)
        rows = _record_inputs(gm, groups, input_batches(ctx.calibration_data, *ctx.example_inputs(),
                                                        self.num_batches), self.max_rows)
        for index, (source, users) in enumerate(groups.items()):
            label = ",".join(str(u.target) for u in users)
            x = rows.get(source)
            if x is None:
                continue
            weights = [gm.get_submodule(str(u.target)).weight.detach() for u in users]
            alpha, scale = _search(x, weights, self.alphas)
            stats["alpha"][label] = alpha
            if scale is None:
                continue
            for user in users:
                path = str(user.target)
                layer = copy.deepcopy(gm.get_submodule(path))  # never write a shared module
                with torch.no_grad():
                    layer.weight.mul_(scale)
                gm.set_submodule(path, layer)
            if _fold_into_norm(gm, source, users, scale):
                stats["into_norm"] += 1
            else:
                _insert_mul(gm, source, users, scale, index)
                stats["mul_nodes"] += 1
            stats["smoothed"] += 1
        return PassResult(gm, stats["smoothed"] > 0, stats)


def _groups(gm: fx.GraphModule, ctx: PassContext) -> dict[fx.Node, list[fx.Node]]:
    """Plain in-scope Linear nodes (modules called once), grouped by the value they read."""
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    groups: dict[fx.Node, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or calls[str(node.target)] != 1 or not ctx.in_scope(node):
            continue
        info = describe(node, gm)
        if info.kind is Kind.LINEAR and info.weight is not None and info.weight.is_floating_point() \
                and isinstance(node.args[0], fx.Node):
            groups.setdefault(node.args[0], []).append(node)
    return groups


def _record_inputs(gm: fx.GraphModule, groups: dict[fx.Node, list[fx.Node]], batches: list,
                   max_rows: int) -> dict[fx.Node, torch.Tensor]:
    """Up to ``max_rows`` input rows ``[N, C]`` per group, in data order (float32)."""
    rows: dict[fx.Node, list[torch.Tensor]] = {s: [] for s in groups}
    counts = {s: 0 for s in groups}
    handles = []
    for source, users in groups.items():
        def hook(module: nn.Module, args: tuple, source: fx.Node = source) -> None:
            if counts[source] < max_rows:
                flat = args[0].detach().reshape(-1, args[0].shape[-1]).float()[:max_rows - counts[source]]
                rows[source].append(flat.clone())
                counts[source] += flat.shape[0]
        handles.append(gm.get_submodule(str(users[0].target)).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for args, kwargs in batches:
                gm(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return {s: torch.cat(r) for s, r in rows.items() if r}


def _int8_error(x: torch.Tensor, weights: list[torch.Tensor], scale: torch.Tensor | None) -> float:
    """Squared error of the int8 outputs against float, with inputs divided by ``scale``."""
    xs = x if scale is None else x / scale
    act_spec: QuantSpec = default_activation_spec().replace(observer="minmax")
    observer = make_observer(act_spec)
    observer(xs)
    xq = fake_quantize(xs, *observer.calculate_qparams(), act_spec)
    error = 0.0
    for w in weights:
        ws = w if scale is None else w * scale
        w_spec = default_weight_spec()
        w_obs = make_observer(w_spec)
        w_obs(ws)
        wq = fake_quantize(ws, *w_obs.calculate_qparams(), w_spec)
        error += float(((xq @ wq.T - x @ w.T).double() ** 2).sum())
    return error


def _search(x: torch.Tensor, weights: list[torch.Tensor], alphas: tuple[float, ...]) -> tuple[float | None,
                                                                                              torch.Tensor | None]:
    """The alpha (None: no smoothing) and scale with the smallest int8 output error."""
    act_max = x.abs().amax(dim=0).clamp(min=_MIN)
    weight_max = torch.stack([w.abs().amax(dim=0) for w in weights]).amax(dim=0).clamp(min=_MIN)
    best: tuple[float, float | None, torch.Tensor | None] = (_int8_error(x, weights, None), None, None)
    with torch.no_grad():
        for alpha in alphas:
            scale = (act_max ** alpha / weight_max ** (1 - alpha)).clamp(min=_MIN)
            error = _int8_error(x, weights, scale)
            if error < best[0]:
                best = (error, float(alpha), scale)
    return best[1], best[2]


def _fold_into_norm(gm: fx.GraphModule, source: fx.Node, users: list[fx.Node], scale: torch.Tensor) -> bool:
    """Divide the affine LayerNorm producing ``source`` by ``scale`` when only the group reads it."""
    if source.op != "call_module" or set(source.users) != set(users):
        return False
    norm = gm.get_submodule(str(source.target))
    if describe(source, gm).op != "layer_norm" or not norm.elementwise_affine or norm.weight is None \
            or sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == source.target) != 1:
        return False
    norm = copy.deepcopy(norm)
    with torch.no_grad():
        norm.weight.div_(scale)
        if norm.bias is not None:
            norm.bias.div_(scale)
    gm.set_submodule(str(source.target), norm)
    return True


def _insert_mul(gm: fx.GraphModule, source: fx.Node, users: list[fx.Node], scale: torch.Tensor, index: int) -> None:
    """``users`` read ``source * (1 / scale)`` (a buffer) instead of ``source``."""
    name = f"{_SCALE_PREFIX}{index}"
    gm.register_buffer(name, (1.0 / scale).detach().clone())
    graph = gm.graph
    first = min(users, key=lambda u: list(graph.nodes).index(u))
    with graph.inserting_before(first):
        factor = graph.get_attr(name)
        scaled = graph.call_function(torch.mul, (source, factor))
    record_meta(factor, getattr(gm, name))
    scaled.meta.update({k: source.meta[k] for k in ("tensor_meta", "type") if k in source.meta})
    for user in users:
        user.replace_input_with(source, scaled)
