"""Latency per layer shape, measured on this CPU once and cached: what ``target="latency"`` counts.

A model's latency estimate is the sum, over its conv and linear nodes, of the
measured time of that layer alone at its traced input shape (one call of a
module of the same type, sizes and hyper-parameters on random data, at the
current torch thread count).  Other ops (activations, pools, adds) are not
counted: they scale with the same channels and are small next to the
layers, and leaving them out keeps the table small.  The table is keyed by
CPU model, torch version and thread count, kept in memory and in
``<cache dir>/latency.json`` (``$FXCOMPRESS_CACHE_DIR``), so each shape is
measured once per machine.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from typing import Any

import torch
from torch import fx, nn

from ..ops import Kind, describe, describe_module
from .analysis import cache_directory
from .files import write_atomically

__all__ = ["LatencyTable", "layer_key", "resource", "RESOURCES"]

#: What a budget can count.
RESOURCES = ("macs", "params", "latency")


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def layer_key(module: nn.Module, input_shape: tuple[int, ...]) -> str | None:
    """A string naming what a conv / linear layer computes at an input shape (None for other modules)."""
    info = describe_module(module)
    if info.kind is Kind.LINEAR:
        return f"linear|{module.in_features}|{module.out_features}|{module.bias is not None}|{input_shape}"
    if info.kind is Kind.CONV:
        return (f"{type(module).__name__}|{module.in_channels}|{module.out_channels}|{module.kernel_size}|"
                f"{module.stride}|{module.padding}|{module.dilation}|{module.groups}|{module.bias is not None}|"
                f"{input_shape}")
    return None


class LatencyTable:
    """Measured seconds per layer shape on this CPU; :meth:`model_seconds` sums a graph's layers."""

    def __init__(self, persist: bool = True) -> None:
        self.context = f"{_cpu()}|torch {torch.__version__}|threads {torch.get_num_threads()}"
        self.persist = persist
        self.entries: dict[str, float] = {}
        self.measured = 0
        if persist:
            try:
                self.entries = json.loads(self._path().read_text()).get(self.context, {})
            except (OSError, ValueError):
                self.entries = {}

    def _path(self) -> Any:
        return cache_directory() / "latency.json"

    def seconds(self, module: nn.Module, input_shape: tuple[int, ...]) -> float:
        """The time of one call of ``module`` on an input of ``input_shape`` (measured on first use)."""
        key = layer_key(module, input_shape)
        if key is None:
            return 0.0
        if key not in self.entries:
            self.entries[key] = _measure(module, input_shape)
            self.measured += 1
        return self.entries[key]

    def model_seconds(self, gm: fx.GraphModule) -> float:
        """The sum of the measured times of ``gm``'s conv and linear nodes at their traced shapes."""
        total = 0.0
        for node in gm.graph.nodes:
            if node.op != "call_module" or describe(node, gm).kind not in (Kind.CONV, Kind.LINEAR):
                continue
            source = node.args[0] if node.args else None
            meta = source.meta.get("tensor_meta") if isinstance(source, fx.Node) else None
            if meta is None or not hasattr(meta, "shape"):
                continue
            total += self.seconds(gm.get_submodule(str(node.target)), tuple(meta.shape))
        return total

    def save(self) -> None:
        """Write the table (merged with what other contexts measured) to the cache directory."""
        if not self.persist or not self.measured:
            return
        path = self._path()
        try:
            data = json.loads(path.read_text()) if path.exists() else {}
        except (OSError, ValueError):
            data = {}
        data.setdefault(self.context, {}).update(self.entries)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, json.dumps(data, indent=1, sort_keys=True))
        except OSError:
            pass


def _measure(module: nn.Module, input_shape: tuple[int, ...], min_seconds: float = 0.02) -> float:
    """Median seconds per call of a copy of ``module`` over 5 timed blocks of at least
    ``min_seconds`` / 5 each, on seeded random data (the time depends on shapes, not values)."""
    layer = copy.deepcopy(module).eval()
    x = torch.randn(input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer(x)
        start = time.perf_counter()
        layer(x)
        once = max(time.perf_counter() - start, 1e-6)
        repeats = max(1, int(min_seconds / once))
        blocks = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(repeats):
                layer(x)
            blocks.append((time.perf_counter() - start) / repeats)
    return statistics.median(blocks)


def resource(gm: fx.GraphModule, target: str, table: LatencyTable | None = None) -> float:
    """What ``gm`` costs in ``target``: MACs, parameters (weights) or estimated seconds."""
    if target == "macs":
        from ..macs import count_macs

        return float(count_macs(gm))
    if target == "params":
        from ..report import weight_count

        return float(weight_count(gm))
    if target == "latency":
        return (table or LatencyTable()).model_seconds(gm)
    raise ValueError(f"unknown resource {target!r}; one of {RESOURCES}")
