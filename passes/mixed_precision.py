"""``mixed_precision``: per layer float / int8 / int4 weights, chosen to a metric, size or latency budget."""

from __future__ import annotations

import dataclasses
import heapq
import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from fxcompress.api import _private_copy
from fxcompress.errors import ConfigError
from fxcompress.pass_base import Pass, PassContext, PassResult
from fxcompress.quant.layers import ObservedLayer
from fxcompress.quant.observers import make_observer
from fxcompress.quant.spec import default_activation_spec
from fxcompress.registry import get_pass
from fxcompress.report import state_bytes
from fxcompress.verify import role_of
from fxcompress.budget import BITS, LatencyTable, Sensitivity, evaluate_metric, sensitivity
from fxcompress.budget.candidates import kernel_weight_spec, weight_spec
from fxcompress.quant.kernels import onednn_int8_support
from fxcompress.quant.lowering.timing import median_seconds

__all__ = ["MixedPrecision"]

_FLOAT = "float"
_CHOICES = (_FLOAT, *BITS)


@dataclass(frozen=True)
class MixedPrecision(Pass):
    """Quantizes each in-scope conv and linear to the precision of ``choices`` (float, int8,
    int4 weights) that a budget allows, smallest first where it costs least: to the smallest
    model within ``max_drop`` of the float metric (measured with ``eval_fn``), to the
    best model within ``max_bytes`` of state, or to the best model whose lowered form runs
    within ``max_latency`` seconds per call; leaves a folded graph (``lower`` follows).

    The order comes from :func:`fxcompress.sensitivity` (SQNR of each layer quantized
    alone): moves "layer L one precision down" are ranked by the output noise they add
    per byte they save, each layer's int8 move before its int4 move, giving a chain of
    configurations from the largest to the smallest.  ``max_bytes`` takes the first of
    the chain that fits (measured on the built graph); ``max_drop`` binary-searches the
    chain for the last configuration whose measured drop is within the budget (the drop
    grows along the chain; each probe builds and evaluates the model).

    ``max_latency`` (seconds per call on the example inputs, at the current torch thread
    count) ranks the moves "layer L float -> int8" by noise per second of float time the
    layer takes (:class:`~fxcompress.budget.LatencyTable`); int4 is not a latency move
    (its codes run on the same int8 kernels). Each probe lowers a copy
    (``lower(backend="x86", only_if_faster=True)``, what ``recipes.int8_static`` does) and
    times it; the first configuration of the chain within the budget is taken (the
    lowered time falls along the chain, up to noise: the chosen one is measured and the
    report says whether it met the budget). Its int8 layers take the weights this CPU's
    kernels run exactly (:func:`~fxcompress.budget.candidates.kernel_weight_spec`: 7-bit on
    AVX2), and it needs the x86 int8 kernels (a ConfigError elsewhere).  Quantized layers
    get 8-bit activations (``activations``; the int8 kernels take no other) calibrated on
    ``calibration_data``, exactly as ``insert_observers`` + ``calibrate`` +
    ``fold_fake_quant`` make them.  A budget that cannot be met gives the closest model
    (the smallest or fastest for ``max_bytes`` / ``max_latency``, the float-most for
    ``max_drop``), with
    ``budget.met = False`` and a note, never silently.  A layer that no precision in
    ``choices`` can take (float excluded, the layer not quantizable) is a ConfigError
    naming it.  ``eval_fn`` returning a non-number or NaN raises MetricError.  Stats:
    ``precision`` (layer -> choice), ``kept_float`` (layer -> reason), ``bytes``,
    ``metric``, ``latency`` (with ``max_latency``), ``budget``, ``trials`` (every
    configuration evaluated).
    """

    name = "mixed_precision"
    requires = ("fuse_conv_bn",)
    provides = ("insert_observers", "calibrate", "fold_fake_quant")
    eval_only = True

    max_drop: float | None = None
    max_bytes: int | None = None
    max_latency: float | None = None
    choices: tuple[str, ...] = _CHOICES
    activations: bool = True
    num_batches: int | None = None

    def __post_init__(self) -> None:
        budgets = {"max_drop": self.max_drop, "max_bytes": self.max_bytes, "max_latency": self.max_latency}
        if sum(v is not None for v in budgets.values()) != 1:
            raise ConfigError("give exactly one budget, max_drop (metric points), max_bytes (state "
                              "bytes) or max_latency (seconds per call); got "
                              + ", ".join(f"{k}={v!r}" for k, v in budgets.items()))
        if self.max_drop is not None and not (isinstance(self.max_drop, (int, float)) and self.max_drop >= 0):
            raise ConfigError(f"max_drop must be a number >= 0, got {self.max_drop!r}")
        if self.max_bytes is not None and (isinstance(self.max_bytes, bool) or not isinstance(self.max_bytes, int)
                                           or self.max_bytes < 1):
            raise ConfigError(f"max_bytes must be a positive int, got {self.max_bytes!r}")
        if self.max_latency is not None and (isinstance(self.max_latency, bool) or not isinstance(
                self.max_latency, (int, float)) or not 0 < self.max_latency < math.inf):
            raise ConfigError(f"max_latency must be a positive number of seconds, got {self.max_latency!r}")
        if self.max_latency is not None and "int8" not in self.choices:
            raise ConfigError(f"max_latency needs 'int8' in choices (int4 codes run on the same int8 "
                              f"kernels, so only float -> int8 changes the time), got {self.choices!r}")
        bad = [c for c in self.choices if c not in _CHOICES]
        if bad or not [c for c in self.choices if c != _FLOAT]:
            raise ConfigError(f"choices must be taken from {_CHOICES} and include a quantized one, "
                              f"got {self.choices!r}")

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if self.max_drop is not None and ctx.eval_fn is None:
            raise ConfigError("max_drop is measured with eval_fn(model) -> metric; give "
                              "eval_fn to fxcompress.run, or use max_bytes")
        if self.max_latency is not None and not (support := onednn_int8_support()):
            raise ConfigError(f"max_latency times the model lowered for the x86 int8 kernels, "
                              f"which cannot run here ({support.reason}); use max_drop or max_bytes")
        timed = self.max_latency is not None
        quantized = ["int8"] if timed else [c for c in _CHOICES[1:] if c in self.choices]
        sens = sensitivity(gm, ctx.example_kwargs or ctx.example_args, calibration_data=ctx.calibration_data,
                           quant=quantized, prune_ratios=(), activations=self.activations,
                           num_batches=self.num_batches, progress=ctx.progress)
        layers = [p for p in sens.layers() if ctx.in_scope(p)]
        kept = dict(sens.kept_float)
        kept.update({p: "out of scope (scope/skip)" for p in sens.layers() if p not in layers})
        if _FLOAT not in self.choices and sens.kept_float:
            path, reason = next(iter(sens.kept_float.items()))
            raise ConfigError(f"layer {path!r} can take none of the precisions {self.choices} "
                              f"({reason}); add 'float' to choices or exclude it with skip")
        start = _FLOAT if _FLOAT in self.choices else quantized[0]
        per_layer = _float_seconds(gm, layers) if timed else None
        chain = _chain(sens, layers, start, quantized, per_layer)
        float_bytes = state_bytes(gm)
        trials: dict[int, dict[str, Any]] = {}

        def probe(k: int) -> dict[str, Any]:
            if k not in trials:
                trial = _private_copy(gm)
                self._build(trial, chain[k], ctx)
                row: dict[str, Any] = {"step": k, "bytes": state_bytes(trial)}
                if ctx.eval_fn is not None:
                    row["metric"] = evaluate_metric(ctx.eval_fn, trial, f"for mixed-precision configuration {k}")
                if timed:
                    row["seconds"] = _lowered_seconds(trial, ctx)
                trials[k] = row
            return trials[k]

        baseline = evaluate_metric(ctx.eval_fn, gm, "for the float model") if ctx.eval_fn is not None else None
        if self.max_drop is not None:
            k, met = self._search_drop(probe, len(chain), baseline)
        else:
            measure, budget = ("seconds", self.max_latency) if timed else ("bytes", self.max_bytes)
            k, met = _first_within(lambda i: probe(i)[measure], len(chain), budget)
        config = chain[k]
        self._build(gm, config, ctx)
        after = probe(k)
        stats: dict[str, Any] = {
            "precision": {p: config.get(p, _FLOAT) for p in sens.layers()},
            "kept_float": kept,
            "bytes": {"float": float_bytes, "after": after["bytes"], "ratio": round(after["bytes"] / float_bytes, 4)},
            "budget": {"max_drop": self.max_drop, "max_bytes": self.max_bytes, "max_latency": self.max_latency,
                       "met": met},
            "trials": [trials[i] for i in sorted(trials)],
        }
        if timed:
            float_seconds = probe(0)["seconds"] if start == _FLOAT else None
            stats["latency"] = {"float": float_seconds, "after": after["seconds"], "threads": torch.get_num_threads()}
        if baseline is not None:
            stats["metric"] = {"float": baseline, "after": after["metric"], "drop": baseline - after["metric"]}
        counts = {c: sum(1 for v in stats["precision"].values() if v == c) for c in _CHOICES}
        notes = [f"{counts['int4']} int4, {counts['int8']} int8, {counts['float']} float layers; state "
                 f"{after['bytes'] / float_bytes:.3f}x of float"]
        if timed:
            notes.append(f"lowered: {after['seconds'] * 1e3:.3g} ms per call at {torch.get_num_threads()} "
                         f"thread(s) (budget {self.max_latency * 1e3:.3g} ms)")
        if not met:
            budget = next(f"{k}={v}" for k, v in (("max_drop", self.max_drop), ("max_bytes", self.max_bytes),
                                                    ("max_latency", self.max_latency)) if v is not None)
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

    def _build(self, gm: fx.GraphModule, config: dict[str, str], ctx: PassContext) -> None:
        """Quantize ``gm`` in place to ``config`` (layer -> precision; absent layers stay float)."""
        quantized = [p for p, c in config.items() if c != _FLOAT]
        if not quantized:
            return
        sub = dataclasses.replace(ctx, scope=tuple(quantized), skip=())
        int8 = kernel_weight_spec() if self.max_latency is not None else weight_spec("int8")
        observe = get_pass("insert_observers")(weights=int8,
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


def _first_within(measure: Any, n: int, budget: float) -> tuple[int, bool]:
    """The first configuration of the chain whose measure is within ``budget`` (binary search:
    the measure falls along the chain), and whether it is; the last one when none is."""
    lo, hi = 0, n - 1
    if measure(hi) > budget:
        return hi, False
    while lo < hi:
        mid = (lo + hi) // 2
        if measure(mid) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return lo, measure(lo) <= budget


def _float_seconds(gm: fx.GraphModule, layers: list[str]) -> dict[str, float]:
    """Each layer's measured float time at its traced input shape (what lowering it can save)."""
    table = LatencyTable()
    seconds = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and str(node.target) in layers and node.args:
            meta = node.args[0].meta.get("tensor_meta") if isinstance(node.args[0], fx.Node) else None
            if meta is not None and hasattr(meta, "shape"):
                seconds[str(node.target)] = seconds.get(str(node.target), 0.0) + table.seconds(
                    gm.get_submodule(str(node.target)), tuple(meta.shape))
    table.save()
    return seconds


def _lowered_seconds(trial: fx.GraphModule, ctx: PassContext) -> float:
    """Median seconds per call of ``trial`` lowered for x86 (on a copy) on the example inputs."""
    lowered = _private_copy(trial)
    if any(role_of(m) for m in lowered.modules()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its speed warning: the time is what this pass reads
            get_pass("lower")(backend="x86", only_if_faster=True)(lowered, ctx)
        lowered.recompile()
    args, kwargs = ctx.example_inputs()
    return median_seconds(lambda: lowered(*args, **kwargs), min_run_time=0.3)


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


def _chain(sens: Sensitivity, layers: list[str], start: str, quantized: list[str],
           seconds: dict[str, float] | None = None) -> list[dict[str, str]]:
    """Configurations from every layer at ``start`` to every layer at the smallest precision, one
    move per step, cheapest noise per saved byte (or, given ``seconds``, per second of float
    time) first (a layer's moves in order)."""
    ladder = ([_FLOAT] if start == _FLOAT else []) + quantized
    config = {p: ladder[0] for p in layers}
    heap: list[tuple[float, int, str, int]] = []

    def push(index: int, path: str, rung: int) -> None:
        if rung + 1 < len(ladder):
            a, b = ladder[rung], ladder[rung + 1]
            saved = (max(seconds.get(path, 0.0), 1e-9) if seconds is not None
                     else max(_bytes(sens, path, b) - _bytes(sens, path, a), 1))
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
