"""``mixed_precision``: per layer float / int8 / int4 weights, chosen to a metric or size budget."""

from __future__ import annotations

import dataclasses
import heapq
import math
from dataclasses import dataclass
from typing import Any

from torch import fx

from fxcompress.api import _private_copy
from fxcompress.errors import ConfigError
from fxcompress.pass_base import Pass, PassContext, PassResult
from fxcompress.quant.layers import ObservedLayer
from fxcompress.quant.observers import make_observer
from fxcompress.quant.spec import default_activation_spec
from fxcompress.registry import get_pass
from fxcompress.report import state_bytes
from fxcompress.budget import BITS, Sensitivity, evaluate_metric, sensitivity
from fxcompress.budget.candidates import weight_spec

__all__ = ["MixedPrecision"]

_FLOAT = "float"
_CHOICES = (_FLOAT, *BITS)


@dataclass(frozen=True)
class MixedPrecision(Pass):
    """Quantizes each in-scope conv and linear to the precision of ``choices`` (float, int8,
    int4 weights) that a budget allows, smallest first where it costs least: to the smallest
    model within ``max_drop`` of the float metric (measured with ``eval_fn``), or to the
    best model within ``max_bytes`` of state; leaves a folded graph (``lower`` follows).

    The order comes from :func:`fxcompress.sensitivity` (SQNR of each layer quantized
    alone): moves "layer L one precision down" are ranked by the output noise they add
    per byte they save, each layer's int8 move before its int4 move, giving a chain of
    configurations from the largest to the smallest.  ``max_bytes`` takes the first of
    the chain that fits (measured on the built graph); ``max_drop`` binary-searches the
    chain for the last configuration whose measured drop is within the budget (the drop
    grows along the chain; each probe builds and evaluates the model).  Quantized layers
    get 8-bit activations (``activations``; the int8 kernels take no other) calibrated on
    ``calibration_data``, exactly as ``insert_observers`` + ``calibrate`` +
    ``fold_fake_quant`` make them.  A budget that cannot be met gives the closest model
    (the smallest for ``max_bytes``, the float-most for ``max_drop``), with
    ``budget.met = False`` and a note, never silently.  A layer that no precision in
    ``choices`` can take (float excluded, the layer not quantizable) is a ConfigError
    naming it.  ``eval_fn`` returning a non-number or NaN raises MetricError.  Stats:
    ``precision`` (layer -> choice), ``kept_float`` (layer -> reason), ``bytes``,
    ``metric``, ``budget``, ``trials`` (every configuration evaluated).
    """

    name = "mixed_precision"
    requires = ("fuse_conv_bn",)
    provides = ("insert_observers", "calibrate", "fold_fake_quant")
    eval_only = True

    max_drop: float | None = None
    max_bytes: int | None = None
    choices: tuple[str, ...] = _CHOICES
    activations: bool = True
    num_batches: int | None = None

    def __post_init__(self) -> None:
        where = f"pass {self.name!r}"
        if (self.max_drop is None) == (self.max_bytes is None):
            raise ConfigError(f"{where}: give exactly one budget, max_drop (metric points) or max_bytes "
                              f"(state bytes); got max_drop={self.max_drop!r}, max_bytes={self.max_bytes!r}")
        if self.max_drop is not None and not (isinstance(self.max_drop, (int, float)) and self.max_drop >= 0):
            raise ConfigError(f"{where}: max_drop must be a number >= 0, got {self.max_drop!r}")
        if self.max_bytes is not None and (isinstance(self.max_bytes, bool) or not isinstance(self.max_bytes, int)
                                           or self.max_bytes < 1):
            raise ConfigError(f"{where}: max_bytes must be a positive int, got {self.max_bytes!r}")
        bad = [c for c in self.choices if c not in _CHOICES]
        if bad or not [c for c in self.choices if c != _FLOAT]:
            raise ConfigError(f"{where}: choices must be taken from {_CHOICES} and include a quantized one, "
                              f"got {self.choices!r}")

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if self.max_drop is not None and ctx.eval_fn is None:
            raise ConfigError(f"pass {self.name!r}: max_drop is measured with eval_fn(model) -> metric; give "
                              f"eval_fn to fxcompress.run, or use max_bytes")
        quantized = [c for c in _CHOICES[1:] if c in self.choices]
        sens = sensitivity(gm, ctx.example_kwargs or ctx.example_args, calibration_data=ctx.calibration_data,
                           quant=quantized, prune_ratios=(), activations=self.activations,
                           num_batches=self.num_batches, progress=ctx.progress)
        layers = [p for p in sens.layers() if ctx.in_scope(p)]
        kept = dict(sens.kept_float)
        kept.update({p: "out of scope (scope/skip)" for p in sens.layers() if p not in layers})
        if _FLOAT not in self.choices and sens.kept_float:
            path, reason = next(iter(sens.kept_float.items()))
            raise ConfigError(f"pass {self.name!r}: layer {path!r} can take none of the precisions {self.choices} "
                              f"({reason}); add 'float' to choices or exclude it with skip")
        start = _FLOAT if _FLOAT in self.choices else quantized[0]
        chain = _chain(sens, layers, start, quantized)
        float_bytes = state_bytes(gm)
        trials: dict[int, dict[str, Any]] = {}

        def probe(k: int) -> dict[str, Any]:
            if k not in trials:
                trial = _private_copy(gm)
                self._build(trial, chain[k], ctx)
                row: dict[str, Any] = {"step": k, "bytes": state_bytes(trial)}
                if ctx.eval_fn is not None:
                    row["metric"] = evaluate_metric(ctx.eval_fn, trial, f"for mixed-precision configuration {k}")
                trials[k] = row
            return trials[k]

        baseline = evaluate_metric(ctx.eval_fn, gm, "for the float model") if ctx.eval_fn is not None else None
        k, met = (self._search_drop(probe, len(chain), baseline) if self.max_drop is not None
                  else self._search_bytes(probe, len(chain)))
        config = chain[k]
        self._build(gm, config, ctx)
        after = probe(k)
        stats: dict[str, Any] = {
            "precision": {p: config.get(p, _FLOAT) for p in sens.layers()},
            "kept_float": kept,
            "bytes": {"float": float_bytes, "after": after["bytes"], "ratio": round(after["bytes"] / float_bytes, 4)},
            "budget": {"max_drop": self.max_drop, "max_bytes": self.max_bytes, "met": met},
            "trials": [trials[i] for i in sorted(trials)],
        }
        if baseline is not None:
            stats["metric"] = {"float": baseline, "after": after["metric"], "drop": baseline - after["metric"]}
        counts = {c: sum(1 for v in stats["precision"].values() if v == c) for c in _CHOICES}
        notes = [f"{counts['int4']} int4, {counts['int8']} int8, {counts['float']} float layers; state "
                 f"{after['bytes'] / float_bytes:.3f}x of float"]
        if not met:
            budget = f"max_drop={self.max_drop}" if self.max_drop is not None else f"max_bytes={self.max_bytes}"
            notes.append(f"budget MISSED ({budget}): returning the closest configuration "
                         f"({after['bytes']} bytes" + (f", drop {baseline - after['metric']:.4g}"
                                                       if baseline is not None else "") + ")")
        stats["notes"] = notes
        return PassResult(gm, True, stats)

    def _search_drop(self, probe: Any, n: int, baseline: float) -> tuple[int, bool]:
        """The last configuration of the chain within max_drop (binary search), and whether one is."""
        def ok(k: int) -> bool:
            return baseline - probe(k)["metric"] <= self.max_drop  # type: ignore[operator]

        if not ok(0):
            return 0, False
        lo, hi = 0, n - 1  # ok(lo) holds
        if ok(hi):
            return hi, True
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if ok(mid):
                lo = mid
            else:
                hi = mid
        return lo, True

    def _search_bytes(self, probe: Any, n: int) -> tuple[int, bool]:
        """The first configuration of the chain within max_bytes, and whether one is."""
        lo, hi = 0, n - 1
        if probe(hi)["bytes"] > self.max_bytes:  # type: ignore[operator]
            return hi, False
        while lo < hi:
            mid = (lo + hi) // 2
            if probe(mid)["bytes"] <= self.max_bytes:  # type: ignore[operator]
                hi = mid
            else:
                lo = mid + 1
        return lo, True

    def _build(self, gm: fx.GraphModule, config: dict[str, str], ctx: PassContext) -> None:
        """Quantize ``gm`` in place to ``config`` (layer -> precision; absent layers stay float)."""
        quantized = [p for p, c in config.items() if c != _FLOAT]
        if not quantized:
            return
        sub = dataclasses.replace(ctx, scope=tuple(quantized), skip=())
        observe = get_pass("insert_observers")(weights=weight_spec("int8"),
                                               activations=default_activation_spec() if self.activations else None)
        observe(gm, sub)
        gm.recompile()  # the observer nodes must run during calibration
        for path in quantized:
            if config[path] != "int8":
                layer = gm.get_submodule(path)
                assert isinstance(layer, ObservedLayer)
                gm.set_submodule(path, ObservedLayer(layer.module, make_observer(weight_spec(config[path]),
                                                                                 where=path)))
        if self.activations:
            get_pass("calibrate")(num_batches=self.num_batches)(gm, sub)
        get_pass("fold_fake_quant")()(gm, sub)
        gm.recompile()


def _noise(sens: Sensitivity, path: str, precision: str) -> float:
    """The relative output noise power of a layer at a precision (0 for float)."""
    if precision == _FLOAT:
        return 0.0
    entry = sens.quant(path, precision)
    db = entry.sqnr_db if entry is not None else -math.inf
    return 0.0 if db == math.inf else 10.0 ** (-db / 10.0) if db > -math.inf else math.inf


def _bytes(sens: Sensitivity, path: str, precision: str) -> int:
    """Bytes a precision saves on a layer's weight (0 for float)."""
    if precision == _FLOAT:
        return 0
    entry = sens.quant(path, precision)
    return entry.saved["bytes"] if entry is not None else 0


def _chain(sens: Sensitivity, layers: list[str], start: str, quantized: list[str]) -> list[dict[str, str]]:
    """Configurations from every layer at ``start`` to every layer at the smallest precision, one
    move per step, cheapest noise per saved byte first (a layer's moves in order)."""
    ladder = ([_FLOAT] if start == _FLOAT else []) + quantized
    config = {p: ladder[0] for p in layers}
    heap: list[tuple[float, int, str, int]] = []

    def push(index: int, path: str, rung: int) -> None:
        if rung + 1 < len(ladder):
            a, b = ladder[rung], ladder[rung + 1]
            saved = max(_bytes(sens, path, b) - _bytes(sens, path, a), 1)
            cost = max(_noise(sens, path, b) - _noise(sens, path, a), 0.0)
            heapq.heappush(heap, (cost / saved, index, path, rung + 1))

    for i, path in enumerate(layers):
        push(i, path, 0)
    chain = [dict(config)]
    while heap:
        _, index, path, rung = heapq.heappop(heap)
        config[path] = ladder[rung]
        chain.append(dict(config))
        push(index, path, rung)
    return chain
