"""Timing for ``lower(only_if_faster=True)`` and its speed check.

Medians from ``torch.utils.benchmark`` (``blocked_autorange``), at the thread count
the caller runs with. Per layer, the int8 kernel (requantization and fused post-ops
included) is compared with the float layer that would replace it (the dequantized
weight), on random inputs of the layer's traced shape: kernel against kernel, the
quantize/dequantize at float boundaries not counted.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import fx, nn

from fxcompress.quant.activations import QDQ
from fxcompress.quant.layers import FoldedLayer
from fxcompress.quant.lowered import LoweredModule, QuantConv2d
from fxcompress.quant.lowering.build import float_twin

__all__ = ["median_seconds", "faster_or_float", "float_reference"]


def median_seconds(fn: Callable[[], Any], min_run_time: float = 0.05) -> float:
    """Median seconds per call of ``fn`` (a few warm-up calls first: kernels pack lazily)."""
    # Imported here, not at module level: torch.utils.benchmark pulls in cpp_extension, which
    # costs ~0.5 s and logs a CUDA warning; only lower(only_if_faster=True) needs it.
    from fxcompress.bench import Timer
    with torch.inference_mode():
        for _ in range(2):
            fn()
        return Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median


def _shape(node: Any) -> tuple[int, ...]:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if hasattr(meta, "shape") else ()


def _codes(shape: tuple[int, ...]) -> torch.Tensor:
    codes = torch.randint(0, 256, shape, dtype=torch.uint8)
    return codes.contiguous(memory_format=torch.channels_last) if len(shape) == 4 else codes


def faster_or_float(node: fx.Node, module: LoweredModule, float_module: nn.Module) -> str | None:
    """None when the int8 ``module`` beats ``float_module`` at ``node``'s traced shapes, else
    the reason (both times) for keeping the layer float."""
    shape = _shape(node.args[0])
    x = torch.randn(shape)
    args: tuple = (_codes(shape),)
    if isinstance(module, QuantConv2d) and module.residual:
        out = _shape(node)
        args += (_codes(out) if module.output == "uint8" else torch.randn(out),)
    t_int8 = median_seconds(lambda: module(*args))
    t_float = median_seconds(lambda: float_module(x))
    if t_int8 < t_float:
        return None
    return (f"kept float: int8 is slower at input {shape} ({t_int8 * 1e6:.0f} us vs {t_float * 1e6:.0f} us "
            f"float, {torch.get_num_threads()} threads)")


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
            owner, _, attr = str(node.target).rpartition(".")
            root[str(node.target)] = getattr(gm.get_submodule(owner), attr)
    return fx.GraphModule(root, graph)
