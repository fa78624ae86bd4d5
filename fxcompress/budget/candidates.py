"""The single changes a sensitivity analysis measures, and how each is applied.

* :class:`QuantCandidate`: one conv / linear layer (of the BatchNorm-fused float
  graph) with its weight quantized to ``bits`` (symmetric, per output channel,
  min/max: the weights ``insert_observers`` makes) and, with ``activations``, its
  input quantized to 8-bit affine per tensor with the qparams a histogram observer
  calibrated (what static int8 gives that layer).  Applied in place with a forward
  pre-hook and a weight swap, and undone exactly.
* :class:`PruneCandidate`: one channel group (of the unfused float graph) losing
  ``ratio`` of its units, least important first, physically sliced on a copy.

Everything else in the model stays float, so each entry measures that one
change alone.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import fx, nn

from ..api import _private_copy
from ..capture import propagate_shapes
from ..ops import Kind, describe
from ..prune import ChannelGraph, apply_removal, build_channel_graph, select
from ..quant.layers import layer_support
from ..quant.observers import make_observer
from ..quant.qparams import fake_quantize
from ..quant.spec import QuantSpec, default_activation_spec, default_weight_spec

__all__ = ["BITS", "QuantCandidate", "PruneCandidate", "quantizable_layers", "input_qparams",
           "quantized_layer", "weight_bytes", "pruned_copy", "prune_removal"]

#: Weight precisions a sensitivity analysis (and mixed precision) knows, by name.
BITS: dict[str, int] = {"int8": 8, "int4": 4}


@dataclass(frozen=True)
class QuantCandidate:
    """Layer ``path`` at ``precision`` ("int8", "int4")."""

    path: str
    precision: str

    @property
    def key(self) -> str:
        return f"quant:{self.path}:{self.precision}"


@dataclass(frozen=True)
class PruneCandidate:
    """Group ``group`` (index in the channel graph; ``name`` for people) pruned at ``ratio``."""

    group: int
    name: str
    ratio: float

    @property
    def key(self) -> str:
        return f"prune:{self.group}:{self.ratio:g}"


def weight_spec(precision: str) -> QuantSpec:
    """The weight spec of a precision: the default int8 weight spec at its bit width."""
    return default_weight_spec().replace(bits=BITS[precision])


def kernel_weight_spec() -> QuantSpec:
    """The int8 weight spec whose layers run on this CPU's int8 kernels: 8-bit where their
    products are exact (VNNI, AMX), 7-bit where they add in saturating 16-bit pairs (AVX2),
    on which 8-bit weights take the slower exact reference path (docs/lowering.md)."""
    from ..quant.isa import int8_arithmetic
    from ..quant.kernels import onednn_int8_support
    from ..quant.spec import portable_weight_spec

    if onednn_int8_support() and not int8_arithmetic().exact_products:
        return portable_weight_spec()
    return default_weight_spec()


def quantizable_layers(gm: fx.GraphModule) -> dict[str, str | None]:
    """Every conv / linear the graph computes, in graph order: module path (or, for a
    functional call, node name) -> None if a layer wrapper can quantize it, else the
    reason it cannot."""
    uses: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            uses[str(node.target)] = uses.get(str(node.target), 0) + 1
    layers: dict[str, str | None] = {}
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function") or describe(node, gm).kind not in (Kind.CONV, Kind.LINEAR):
            continue
        if node.op == "call_function":
            layers[node.name] = "functional call: the weight is not owned by a module"
            continue
        path = str(node.target)
        reason = layer_support(gm.get_submodule(path))
        if reason is None and uses[path] > 1:
            reason = "the module is called at more than one node"
        layers[path] = reason
    return layers


def input_qparams(gm: fx.GraphModule, paths: list[str],
                  batches: list[tuple[tuple, dict]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the 8-bit affine per-tensor qparams of its input calibrated on ``batches``
    with the histogram observer (the default activation spec)."""
    spec = default_activation_spec()
    observers = {p: make_observer(spec, where=p) for p in paths}

    def watcher(observer: nn.Module):
        def hook(module: nn.Module, args: tuple) -> None:  # returning None leaves the inputs as they are
            observer(args[0])
        return hook

    handles = [gm.get_submodule(p).register_forward_pre_hook(watcher(observers[p])) for p in paths]
    try:
        with torch.inference_mode():
            for args, kwargs in batches:
                gm(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return {p: obs.calculate_qparams() for p, obs in observers.items() if obs.has_data}


@contextlib.contextmanager
def quantized_layer(gm: fx.GraphModule, candidate: QuantCandidate,
                    qparams: tuple[torch.Tensor, torch.Tensor] | None) -> Iterator[None]:
    """``gm`` with ``candidate``'s layer quantized (weight, and input when ``qparams``), undone after."""
    module = gm.get_submodule(candidate.path)
    spec = weight_spec(candidate.precision)
    observer = make_observer(spec, where=candidate.path)
    original = module.weight.detach().clone()
    with torch.no_grad():
        observer(original)
        scale, zero_point = observer.calculate_qparams()
        module.weight.copy_(fake_quantize(original, scale, zero_point, spec))
    handle = None
    if qparams is not None:
        act_spec = default_activation_spec()
        in_scale, in_zp = qparams
        handle = module.register_forward_pre_hook(
            lambda m, args: (fake_quantize(args[0], in_scale, in_zp, act_spec), *args[1:]))
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()
        with torch.no_grad():
            module.weight.copy_(original)


def weight_bytes(module: nn.Module, precision: str | None) -> int:
    """Bytes of a layer's weight at ``precision`` (None: float32), scales and zero points included."""
    weight = module.weight
    if precision is None:
        return weight.numel() * weight.element_size()
    channels = weight.shape[0]
    return math.ceil(weight.numel() * BITS[precision] / 8) + channels * 8  # float32 scale + int32 zero point


def prune_removal(cg: ChannelGraph, scores: torch.Tensor, group_ratios: dict[int, float]) -> torch.Tensor:
    """Bool per unit: removed when each group in ``group_ratios`` loses that ratio (others keep all)."""
    return select(cg, scores, ratio=0.0, group_ratios=group_ratios)


def pruned_copy(gm: fx.GraphModule, removed: torch.Tensor, args: tuple, kwargs: dict) -> fx.GraphModule:
    """A copy of ``gm`` with the units ``removed`` sliced away (its channel graph rebuilt on the
    copy: unit indices are the same for the same graph); shapes re-propagated."""
    copy = _private_copy(gm)
    apply_removal(copy, build_channel_graph(copy), removed)
    copy.recompile()
    propagate_shapes(copy, args, kwargs)
    return copy
