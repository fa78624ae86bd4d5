"""``equalize``: cross-layer weight equalization, exact in float (Nagel et al., "Data-Free Quantization")."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from fxcompress.capture import record_meta
from fxcompress.errors import ConfigError
from fxcompress.ops import Kind, OpInfo, describe
from fxcompress.pass_base import Pass, PassContext, PassResult, check_choice

__all__ = ["Equalize"]

_RELU6_MODES = ("clamp", "skip")
_EPS = 1e-12
# buffers holding the per-channel upper bounds of equalized ReLU6s
_UPPER_PREFIX = "fxc_equalize_upper_"


@dataclass(frozen=True)
class Pair:
    """``first`` -> (``act``) -> ``second``: the producer's output channels are the consumer's inputs."""

    first: str
    second: str
    act: fx.Node | None
    relu6: bool
    depthwise: bool


@dataclass(frozen=True)
class Equalize(Pass):
    """Rescales the output channels of each conv / linear by ``1/s`` and the matching input
    channels of the conv / linear that alone reads them (directly or through a ReLU or ReLU6)
    by ``s``, so both weights have equal per-channel ranges, with outputs unchanged in float.

    ``s_i = sqrt(r1_i / r2_i)`` where ``r1_i`` is the range (max |w|) of output channel
    ``i`` of the first layer and ``r2_i`` that of input channel ``i`` of the second; a
    depthwise second layer scales the filters of its group ``i``.  ReLU is positively
    homogeneous (``relu(x / s) = relu(x) / s``), so the pair computes what it did; ReLU6
    is not, so with ``relu6="clamp"`` (the default) it becomes ``relu`` followed by
    ``torch.minimum`` with a per-channel bound ``6 / s`` (a buffer), which is exact too,
    and with ``relu6="skip"`` pairs through a ReLU6 are left alone.  Pairs are equalized
    in graph order, ``iterations`` times (a layer between two pairs converges over the
    rounds).  Only ``call_module`` layers called once, whose output feeds the pair alone,
    take part; BatchNorm between them blocks a pair (run ``fuse_conv_bn`` first: a note
    says so when BatchNorms are present).  Stats: ``pairs`` (count), ``relu6_clamps``,
    ``range_ratio`` (mean over pairs of max/min per-channel weight range of the first
    layer, before -> after).
    """

    name = "equalize"
    exact = True
    eval_only = True

    iterations: int = 4
    relu6: str = "clamp"

    def __post_init__(self) -> None:
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 1:
            raise ConfigError(f"iterations must be a positive int, got {self.iterations!r}")
        check_choice("relu6", self.relu6, _RELU6_MODES)

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        self.check_stage(gm, "equalize the float model, before insert_observers", ("float",))
        pairs = _find_pairs(gm, ctx, self.relu6 == "clamp")
        notes = []
        if any(describe(n, gm).op == "batch_norm" for n in gm.graph.nodes if n.op == "call_module"):
            notes.append("BatchNorm layers are present: a conv followed by BatchNorm pairs with nothing; "
                         "run fuse_conv_bn before equalize")
        stats: dict[str, Any] = {"pairs": len(pairs), "relu6_clamps": 0, "range_ratio": None}
        if not pairs:
            stats["notes"] = notes
            return PassResult(gm, False, stats)
        for path in dict.fromkeys(p for pair in pairs for p in (pair.first, pair.second)):
            gm.set_submodule(path, copy.deepcopy(gm.get_submodule(path)))  # never write a shared module
        uppers = {pair.first: _clamp_relu6(gm, pair, index) for index, pair in enumerate(pairs) if pair.relu6}
        before = _range_ratio(gm, pairs)
        with torch.no_grad():
            for _ in range(self.iterations):
                for pair in pairs:
                    _equalize(gm, pair, uppers.get(pair.first))
        stats.update(relu6_clamps=len(uppers), range_ratio=f"{before:.3g} -> {_range_ratio(gm, pairs):.3g}")
        stats["notes"] = notes + [f"{len(pairs)} layer pairs equalized ({len(uppers)} through ReLU6)"]
        return PassResult(gm, True, stats)


def _layer(gm: fx.GraphModule, node: Any) -> OpInfo | None:
    """What a node calling a plain conv (not transposed) or linear module with a float weight is, or None."""
    if not isinstance(node, fx.Node) or node.op != "call_module":
        return None
    info = describe(node, gm)
    wanted = info.kind is Kind.LINEAR or info.kind is Kind.CONV and not info.transposed
    return info if wanted and info.weight is not None and info.weight.is_floating_point() else None


def _activation(node: fx.Node, gm: fx.GraphModule) -> str | None:
    """"relu" or "relu6" for the activations equalization passes through, else None."""
    info = describe(node, gm)
    if info.kind is not Kind.ACTIVATION:
        return None
    if info.op == "relu":
        return "relu"
    if info.op == "relu6":
        return "relu6"
    if info.op == "hardtanh":
        module = info.module
        low = module.min_val if module is not None else info.params.get("min_val", -1.0)
        high = module.max_val if module is not None else info.params.get("max_val", 1.0)
        return "relu6" if (low, high) == (0.0, 6.0) else None
    return None


def _find_pairs(gm: fx.GraphModule, ctx: PassContext, through_relu6: bool) -> list[Pair]:
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    pairs = []
    for node in gm.graph.nodes:
        first_layer = _layer(gm, node)
        if first_layer is None or calls[str(node.target)] != 1 or len(node.users) != 1 or not ctx.in_scope(node):
            continue
        user = next(iter(node.users))
        act, kind = None, None
        if _layer(gm, user) is None:
            kind = _activation(user, gm)
            if kind is None or len(user.users) != 1 or (kind == "relu6" and not through_relu6):
                continue
            act, user = user, next(iter(user.users))
        second_layer = _layer(gm, user)
        if second_layer is None or calls[str(user.target)] != 1 or user.args[0] is not (act or node) \
                or not ctx.in_scope(user) or first_layer.kind is not second_layer.kind:
            continue
        first, second = first_layer.module, second_layer.module
        channels = first.weight.shape[0]
        groups = getattr(second, "groups", 1)
        depthwise = groups > 1 and groups == channels
        if (groups > 1 and not depthwise) or (second.weight.shape[1] * groups != channels):
            continue
        if getattr(first, "groups", 1) > 1 and act is not None and kind == "relu6" and not through_relu6:
            continue
        pairs.append(Pair(str(node.target), str(user.target), act, kind == "relu6", depthwise))
    return pairs


def _clamp_relu6(gm: fx.GraphModule, pair: Pair, index: int) -> torch.Tensor:
    """Replace the pair's ReLU6 by relu + minimum(x, upper); returns the ``upper`` buffer (6 per channel)."""
    act = pair.act
    assert act is not None
    first = gm.get_submodule(pair.first)
    channels = first.weight.shape[0]
    spatial = first.weight.dim() - 2  # a linear's weight has none
    name = f"{_UPPER_PREFIX}{index}"
    gm.register_buffer(name, torch.full((channels, *([1] * spatial)), 6.0))
    graph = gm.graph
    source = act.args[0]
    with graph.inserting_before(act):
        relu = graph.call_function(torch.relu, (source,))
        upper = graph.get_attr(name)
        bounded = graph.call_function(torch.minimum, (relu, upper))
    record_meta(upper, getattr(gm, name))
    for new in (relu, bounded):
        new.meta.update({k: act.meta[k] for k in ("tensor_meta", "type", "nn_module_stack") if k in act.meta})
    act.replace_all_uses_with(bounded)
    graph.erase_node(act)
    return getattr(gm, name)


def _ranges(gm: fx.GraphModule, pair: Pair) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel: max |w| of the first layer's outputs and of the second layer's inputs."""
    w1 = gm.get_submodule(pair.first).weight
    w2 = gm.get_submodule(pair.second).weight
    r1 = w1.detach().abs().reshape(w1.shape[0], -1).amax(dim=1)
    if pair.depthwise:
        r2 = w2.detach().abs().reshape(w1.shape[0], -1).amax(dim=1)
    else:
        r2 = w2.detach().abs().transpose(0, 1).reshape(w2.shape[1], -1).amax(dim=1)
    return r1, r2


def _equalize(gm: fx.GraphModule, pair: Pair, upper: torch.Tensor | None) -> None:
    first, second = gm.get_submodule(pair.first), gm.get_submodule(pair.second)
    r1, r2 = _ranges(gm, pair)
    scale = torch.where((r1 > _EPS) & (r2 > _EPS), torch.sqrt(r1 / r2.clamp(min=_EPS)), torch.ones_like(r1))
    view1 = (-1, *([1] * (first.weight.dim() - 1)))
    first.weight.div_(scale.reshape(view1))
    if first.bias is not None:
        first.bias.div_(scale)
    if upper is not None:
        upper.div_(scale.reshape(upper.shape))
    if pair.depthwise:
        mult = second.weight.shape[0] // scale.numel()
        second.weight.mul_(scale.repeat_interleave(mult).reshape(-1, *([1] * (second.weight.dim() - 1))))
    else:
        second.weight.mul_(scale.reshape(1, -1, *([1] * (second.weight.dim() - 2))))


def _range_ratio(gm: fx.GraphModule, pairs: list[Pair]) -> float:
    """Mean over pairs of (largest / smallest) per-channel range of the first layer's weight."""
    ratios = []
    for pair in pairs:
        r1, _ = _ranges(gm, pair)
        if r1.min() > 0:
            ratios.append(float(r1.max() / r1.min()))
    return sum(ratios) / len(ratios) if ratios else 1.0
