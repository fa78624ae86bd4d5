""":func:`sensitivity`: what each single quantization or pruning change costs."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import fx, nn

from .. import distributed
from ..api import run, state_hash
from ..capture import normalize_inputs, trace
from ..errors import ConfigError, DistributedError
from ..prune import build_channel_graph, unit_scores
from ..prune.importance import DATA_FREE_CRITERIA
from .candidates import (BITS, PruneCandidate, QuantCandidate, input_qparams, prune_removal, pruned_copy,
                         quantizable_layers, quantized_layer, weight_bytes)
from .measure import OutputSQNR, evaluate_metric, input_batches
from .result import Entry, Sensitivity

__all__ = ["sensitivity", "CACHE_ENV", "cache_directory", "clear_memory_cache"]

#: Environment variable naming the directory of the on-disk caches (default ``~/.cache/fxcompress``).
CACHE_ENV = "FXCOMPRESS_CACHE_DIR"
_MEMORY: dict[str, dict[str, Any]] = {}
_VERSION = 1  # bump when entries would be computed differently


def cache_directory() -> Path:
    """Where on-disk caches live: ``$FXCOMPRESS_CACHE_DIR`` or ``~/.cache/fxcompress``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fxcompress")


def clear_memory_cache() -> None:
    """Forget the analyses cached in this process (the on-disk cache stays)."""
    _MEMORY.clear()


def sensitivity(
    model: nn.Module,
    example_inputs: Any,
    *,
    calibration_data: Iterable,
    eval_fn: Callable[[nn.Module], float] | None = None,
    quant: Sequence[str] = ("int8", "int4"),
    prune_ratios: Sequence[float] = (0.25, 0.5, 0.75),
    activations: bool = True,
    importance: str = "l2",
    num_batches: int | None = None,
    output_dir: str | os.PathLike | None = None,
    plots: bool | None = None,
    cache: bool = True,
    progress: bool = True,
    across_ranks: bool = True,
) -> Sensitivity:
    """Measure, for each quantizable layer and each prunable channel group, what changing
    only that one costs.

    Quantization entries (one per layer and precision in ``quant``): the layer of the
    BatchNorm-fused float model gets symmetric per-channel weights at that precision
    and, with ``activations``, an 8-bit affine per-tensor input calibrated with the
    histogram observer, as static quantization would give it.  Pruning entries (one
    per group and ratio in ``prune_ratios``): the group of the float model loses that
    ratio of its units, least ``importance`` first (``l2``, ``l1``, ``bn_scale``,
    ``random``), physically.  Every entry reports the output SQNR against the float
    model on the first ``num_batches`` batches of ``calibration_data`` (all of them by
    default), the task metric ``eval_fn(model)`` and its drop when given, and what the
    change saves.  Layers no precision can take are listed in ``kept_float``.

    Guarantees: the caller's model is never changed; the result is deterministic for a
    given model, data, options and thread count; a second call with the same model
    (by state hash and graph), data, options and ``eval_fn`` (by name and code) is
    answered from a cache in memory or on disk (``$FXCOMPRESS_CACHE_DIR``;
    ``cache=False`` recomputes) without running the model.  ``output_dir`` receives
    ``sensitivity.md``, ``sensitivity.json`` and the plots (``plots``: see
    :meth:`Sensitivity.save`).  ``eval_fn`` returning a non-number or NaN raises
    :class:`~fxcompress.errors.MetricError` naming the entry.

    Under ``torchrun`` (an initialised process group of more than one rank;
    ``across_ranks=False`` turns it off) every rank passes the same model and data,
    the candidates are dealt round-robin across ranks and the entries gathered: every
    rank returns the same result, bit for bit the single-process one, and only rank 0
    writes files.  A rank that fails makes every rank raise
    :class:`~fxcompress.errors.DistributedError`.
    """
    options = _check_options(quant, prune_ratios, activations, importance, num_batches)
    w = distributed.world() if across_ranks else distributed.World()
    args, kwargs = normalize_inputs(example_inputs)
    batches = input_batches(calibration_data, args, kwargs, num_batches)
    gm = trace(copy_of(model), example_inputs)
    key = _cache_key(model, gm, batches, options, eval_fn)
    w_key = distributed.all_gather_objects(key, w)
    if len(set(w_key)) > 1:
        raise DistributedError("the ranks passed different models, data or options to sensitivity() (their cache "
                               "keys differ); every rank must pass the same model and the same calibration_data "
                               "(sensitivity splits candidates, not data)")
    result = _cached(key) if cache else None
    if result is None:
        start = time.perf_counter()
        with distributed.collective_step("sensitivity", w):
            result = _analyse(model, gm, example_inputs, args, kwargs, batches, eval_fn, options, key,
                              progress and w.is_writer, w)
        result.seconds = round(time.perf_counter() - start, 3)
        result.ranks = w.size
        if cache:
            _store(key, result, w)
    if output_dir is not None:
        distributed.on_rank_zero(lambda: result.save(output_dir, plots=plots), "writing the sensitivity files", w)
    return result


def copy_of(model: nn.Module) -> nn.Module:
    """A private deep copy (the caller's model is never touched)."""
    from ..api import _private_copy

    return _private_copy(model)


def _check_options(quant: Sequence[str], prune_ratios: Sequence[float], activations: bool, importance: str,
                   num_batches: int | None) -> dict[str, Any]:
    if isinstance(quant, str) or not all(q in BITS for q in quant):
        raise ConfigError(f"sensitivity(): quant must be a list of precisions from {sorted(BITS)}, got {quant!r}")
    if isinstance(prune_ratios, (int, float)) or not all(
            isinstance(r, (int, float)) and not isinstance(r, bool) and 0 < r < 1 for r in prune_ratios):
        raise ConfigError(f"sensitivity(): prune_ratios must be a list of numbers in (0, 1), got {prune_ratios!r}")
    if importance not in DATA_FREE_CRITERIA:
        raise ConfigError(f"sensitivity(): importance must be one of {', '.join(DATA_FREE_CRITERIA)}, "
                          f"got {importance!r}")
    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int)
                                    or num_batches < 1):
        raise ConfigError(f"sensitivity(): num_batches must be a positive int or None, got {num_batches!r}")
    return {"quant": list(quant), "prune_ratios": [float(r) for r in prune_ratios], "activations": bool(activations),
            "importance": importance, "num_batches": num_batches}


# -- the analysis -------------------------------------------------------------------
def _analyse(model: nn.Module, gm: fx.GraphModule, example_inputs: Any, args: tuple, kwargs: dict,
             batches: list, eval_fn: Callable | None, options: dict[str, Any], key: str, progress: bool,
             w: distributed.World) -> Sensitivity:
    sqnr = OutputSQNR(gm, batches)
    baseline = evaluate_metric(eval_fn, gm, "for the float model") if eval_fn is not None else None
    fused = run(gm, ["fuse_conv_bn"], example_inputs, check="none", progress=False).model
    support = quantizable_layers(fused)
    layers = [p for p, reason in support.items() if reason is None]
    kept = {p: reason for p, reason in support.items() if reason is not None}
    qparams = input_qparams(fused, layers, batches) if options["activations"] else {}
    candidates: list[Any] = [QuantCandidate(p, q) for p in layers for q in options["quant"]]
    cg = build_channel_graph(gm)
    scores = unit_scores(gm, cg, options["importance"])
    prunable = cg.prunable()
    for g in cg.groups:
        if prunable[g.units].any():
            candidates += [PruneCandidate(g.index, g.name, r) for r in options["prune_ratios"]]
    mine = candidates[w.rank::w.size]
    iterator: Any = mine
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(mine, desc="sensitivity", unit="candidate", leave=False)
    measured: dict[str, Entry | None] = {}
    before = _macs_params(gm)
    for c in iterator:
        if isinstance(c, QuantCandidate):
            measured[c.key] = _quant_entry(fused, c, qparams.get(c.path), sqnr, eval_fn, baseline)
        else:
            measured[c.key] = _prune_entry(gm, cg, scores, c, args, kwargs, sqnr, eval_fn, baseline, before)
    gathered: dict[str, Entry | None] = {}
    for part in distributed.all_gather_objects(measured, w):
        gathered.update(part)
    entries = [e for c in candidates if (e := gathered[c.key]) is not None]
    return Sensitivity(entries, baseline, key, options, kept)


def _quant_entry(fused: fx.GraphModule, c: QuantCandidate, qparams: Any, sqnr: OutputSQNR,
                 eval_fn: Callable | None, baseline: float | None) -> Entry:
    module = fused.get_submodule(c.path)
    with quantized_layer(fused, c, qparams):
        db = sqnr(fused)
        metric = evaluate_metric(eval_fn, fused, f"with {c.path} at {c.precision}") if eval_fn else None
    saved = {"bytes": weight_bytes(module, None) - weight_bytes(module, c.precision)}
    return Entry("quant", c.path, c.precision, db, metric, _drop(baseline, metric), saved=saved)


def _prune_entry(gm: fx.GraphModule, cg: Any, scores: torch.Tensor, c: PruneCandidate, args: tuple, kwargs: dict,
                 sqnr: OutputSQNR, eval_fn: Callable | None, baseline: float | None,
                 before: tuple[int, int]) -> Entry | None:
    removed = prune_removal(cg, scores, {c.group: c.ratio})
    if not removed.any():
        return None  # the ratio rounds to no unit for this group
    pruned = pruned_copy(gm, removed, args, kwargs)
    db = sqnr(pruned)
    metric = evaluate_metric(eval_fn, pruned, f"with group {c.name} pruned at {c.ratio:g}") if eval_fn else None
    macs, params = _macs_params(pruned)
    saved = {"params": before[1] - params, "macs": before[0] - macs}
    return Entry("prune", c.name, c.ratio, db, metric, _drop(baseline, metric), group=c.group, saved=saved)


def _macs_params(gm: fx.GraphModule) -> tuple[int, int]:
    from ..macs import count_macs
    from ..report import weight_count

    return count_macs(gm), weight_count(gm)


def _drop(baseline: float | None, metric: float | None) -> float | None:
    return None if baseline is None or metric is None else baseline - metric


# -- the cache ----------------------------------------------------------------------
def _function_identity(fn: Callable | None) -> str:
    """A name and a hash of the code of ``eval_fn`` (a changed body is a new function)."""
    if fn is None:
        return "none"
    code = getattr(fn, "__code__", None)
    body = hashlib.sha256(code.co_code + repr(code.co_consts).encode()).hexdigest()[:16] if code else "opaque"
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}:{body}"


def _cache_key(model: nn.Module, gm: fx.GraphModule, batches: list, options: dict[str, Any],
               eval_fn: Callable | None) -> str:
    h = hashlib.sha256()
    h.update(f"fxcompress sensitivity|v{_VERSION}|torch {torch.__version__}|{state_hash(model)}".encode())
    h.update(gm.code.encode())
    for args, kwargs in batches:
        for value in (*args, *(kwargs[k] for k in sorted(kwargs))):
            if isinstance(value, torch.Tensor):
                t = value.detach().cpu().contiguous()
                h.update(f"{t.dtype}{tuple(t.shape)}".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            else:
                h.update(repr(value).encode())
    h.update(json.dumps(options, sort_keys=True).encode())
    h.update(_function_identity(eval_fn).encode())
    return h.hexdigest()


def _cache_file(key: str) -> Path:
    return cache_directory() / "sensitivity" / f"{key}.json"


def _cached(key: str) -> Sensitivity | None:
    data = _MEMORY.get(key)
    if data is None:
        try:
            data = json.loads(_cache_file(key).read_text())
        except (OSError, ValueError):
            return None
        _MEMORY[key] = data
    result = Sensitivity.from_dict(data)
    result.cached = True
    return result


def _store(key: str, result: Sensitivity, w: distributed.World) -> None:
    data = result.to_dict()
    _MEMORY[key] = data

    def write() -> None:
        from .files import write_atomically

        path = _cache_file(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, json.dumps(data))
        except OSError:  # a read-only home directory costs the disk cache, nothing else
            pass

    distributed.on_rank_zero(write, "writing the sensitivity cache", w)
