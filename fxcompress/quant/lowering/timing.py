"""Timing for ``lower``'s measured choices (:mod:`.choice`) and its whole-model speed check.

Medians from ``torch.utils.benchmark`` (``blocked_autorange``), at the thread count the
caller runs with; :func:`float_reference` is the float model a lowered one is compared with.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import fx, nn

from fxcompress.ops import attr_value
from fxcompress.quant.activations import QDQ
from fxcompress.quant.layers import FoldedLayer
from fxcompress.quant.lowering.build import float_twin

__all__ = ["median_seconds", "best_medians", "float_reference"]


def median_seconds(fn: Callable[[], Any], min_run_time: float = 0.05) -> float:
    """Median seconds per call of ``fn`` (a few warm-up calls first: kernels pack lazily)."""
    # Imported here, not at module level: torch.utils.benchmark pulls in cpp_extension, which
    # costs ~0.5 s and logs a CUDA warning; only lower(only_if_faster=True) needs it.
    from fxcompress.bench import Timer
    with torch.inference_mode():
        for _ in range(2):
            fn()
        return Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median


def best_medians(calls: dict[str, Callable[[], Any]], rounds: int, min_run_time: float) -> dict[str, float]:
    """Seconds per call of each of ``calls``, timed interleaved over ``rounds`` rounds, each keeping
    its best median: a burst of load on a shared machine then does not decide for one of them."""
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(rounds):
        for name, fn in calls.items():
            best[name] = min(best[name], median_seconds(fn, min_run_time=min_run_time))
    return best


def float_reference(gm: fx.GraphModule) -> fx.GraphModule:
    """The folded graph as a float model: layers with dequantized weights, quantize-dequantize
    points removed. What a lowered model's speed is compared against."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    root: dict[str, Any] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            root[str(node.target)] = (float_twin(module) if isinstance(module, FoldedLayer)
                                      else nn.Identity() if isinstance(module, QDQ) else module)
        elif node.op == "get_attr":
            root[str(node.target)] = attr_value(gm, str(node.target))
    return fx.GraphModule(root, graph)
