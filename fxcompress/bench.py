"""Side-by-side comparison of an original model and its compressed version.

:func:`compare` measures, for both models on the same inputs: weight count,
MACs, serialized size, latency per thread count, the task metric (when an
``eval_fn`` is given), and how well the compressed outputs agree with the
original ones.  :class:`Comparison` renders a table (``str``/:meth:`table`)
and a dict (:meth:`to_dict`).

Agreement is measured over every batch of ``data`` when given (else on the
one ``inputs`` batch), and the comparison warns (``Comparison.warnings``, a
``UserWarning`` each, and a list under the table) when the figures mislead:
top-1 agreement over a handful of rows, a compressed output that collapsed
to a constant or holds NaN/Inf, a compressed model slower than the original,
MACs that leave out modules kept whole.

Guarantees: neither model is modified (parameters, buffers, structure,
training flag, graph metadata), nor the inputs (each call gets a copy);
torch's intra-op thread count is restored afterwards; latencies come from
``torch.utils.benchmark`` with the two models measured in alternating rounds,
so that drift (thermal, frequency, other processes) affects both alike.  A
model that does not run on the inputs is an ``InputError`` naming it.
"""

from __future__ import annotations

import copy
import io
import logging
import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import torch
from tabulate import tabulate
from torch import fx, nn

# torch.utils.benchmark imports torch.utils.cpp_extension, which logs a warning about a
# missing CUDA runtime on CPU-only machines; it is irrelevant to CPU timing.
_cpp_log = logging.getLogger("torch.utils.cpp_extension")
_level = _cpp_log.level
_cpp_log.setLevel(logging.ERROR)
try:
    from torch.utils.benchmark import Measurement, Timer
finally:
    _cpp_log.setLevel(_level)

from .boundary import clone_inputs
from .capture import normalize_inputs, propagate_shapes, trace
from .errors import FxCompressError, InputError
from .report import human, ratio, weight_count

__all__ = ["Latency", "ModelFigures", "Agreement", "Comparison", "compare", "agreement", "serialized_bytes"]


@dataclass(frozen=True)
class Latency:
    """Seconds per call at one thread count: median and interquartile range of the timed blocks."""

    threads: int
    median: float
    iqr: float
    blocks: int


@dataclass
class ModelFigures:
    """What one model costs; ``metric`` is ``eval_fn(model)`` when an eval function was given."""

    parameters: int
    macs: int
    serialized_bytes: int
    latency: dict[int, Latency] = field(default_factory=dict)
    metric: float | None = None
    #: Latency of ``torch.compile(model)`` (inductor), when ``compare(..., compiled=True)``.
    compiled_latency: dict[int, Latency] = field(default_factory=dict)


@dataclass(frozen=True)
class Agreement:
    """How closely the compressed outputs follow the original ones.

    ``sqnr_db`` is 10·log10(Σ ref² / Σ (ref − out)²) over every floating-point
    output of every batch (``inf`` when identical); ``top1_agreement`` is the
    fraction of rows whose argmax matches, for classifier-like outputs (the
    first output is 2-D with more than one class), else None; ``rows`` is how
    many rows that fraction is over, ``batches`` how many batches were compared.
    """

    sqnr_db: float
    max_abs_error: float
    top1_agreement: float | None
    rows: int = 0
    batches: int = 1


@dataclass
class Comparison:
    """The result of :func:`compare`."""

    original: ModelFigures
    compressed: ModelFigures
    agreement: Agreement
    threads: tuple[int, ...]
    warnings: list[str] = field(default_factory=list)

    def speedup(self, threads: int) -> float:
        """Original median latency / compressed median latency at ``threads`` threads."""
        return self.original.latency[threads].median / self.compressed.latency[threads].median

    def to_dict(self) -> dict[str, Any]:
        """Plain data; an SQNR of identical outputs stays ``inf`` (JSON: ``Infinity``)."""

        def figures(f: ModelFigures) -> dict[str, Any]:
            d = asdict(f)
            d["latency"] = {str(t): asdict(lat) for t, lat in f.latency.items()}
            d["compiled_latency"] = {str(t): asdict(lat) for t, lat in f.compiled_latency.items()}
            return d

        return {
            "threads": list(self.threads),
            "original": figures(self.original),
            "compressed": figures(self.compressed),
            "speedup": {str(t): self.speedup(t) for t in self.threads},
            "agreement": asdict(self.agreement),
            "warnings": list(self.warnings),
        }

    def table(self, tablefmt: str = "simple") -> str:
        """Two tables (tabulate): costs side by side, then agreement."""
        a, b = self.original, self.compressed
        rows = [
            ["parameters", f"{a.parameters:,}", f"{b.parameters:,}", ratio(b.parameters, a.parameters)],
            ["MACs", human(a.macs), human(b.macs), ratio(b.macs, a.macs)],
            ["serialized", human(a.serialized_bytes, "B"), human(b.serialized_bytes, "B"),
             ratio(b.serialized_bytes, a.serialized_bytes)],
        ]
        for t in self.threads:
            rows.append([f"latency, {t} thread{'s' if t > 1 else ''}", _ms(a.latency[t]), _ms(b.latency[t]),
                         f"speedup {self.speedup(t):.2f}x"])
        for t in self.threads if b.compiled_latency else ():
            ca, cb = a.compiled_latency[t], b.compiled_latency[t]
            rows.append([f"latency compiled, {t} thread{'s' if t > 1 else ''}", _ms(ca), _ms(cb),
                         f"speedup {ca.median / cb.median:.2f}x"])
        if a.metric is not None or b.metric is not None:
            delta = f"{b.metric - a.metric:+.4g}" if a.metric is not None and b.metric is not None else ""
            rows.append(["task metric", _num(a.metric), _num(b.metric), delta])
        costs = tabulate(rows, headers=["", "original", "compressed", "change"], tablefmt=tablefmt)
        g = self.agreement
        top1 = "-" if g.top1_agreement is None else f"{100 * g.top1_agreement:.2f}% of {g.rows} rows"
        agree = tabulate([["SQNR", f"{g.sqnr_db:.2f} dB"], ["max abs error", f"{g.max_abs_error:.4g}"],
                          ["top-1 agreement", top1], ["batches compared", g.batches]],
                         headers=["output agreement", ""], tablefmt=tablefmt, disable_numparse=True)
        notes = "".join(f"\n- {w}" for w in self.warnings)
        return f"{costs}\n\n{agree}" + (f"\n\nwarnings:{notes}" if notes else "")

    def __str__(self) -> str:
        return self.table()


def compare(
    original: nn.Module,
    compressed: nn.Module,
    inputs: Any,
    *,
    data: Iterable | None = None,
    eval_fn: Callable[[nn.Module], float] | None = None,
    threads: tuple[int, ...] = (1, 2),
    min_run_time: float = 1.0,
    rounds: int = 4,
    compiled: bool = False,
) -> Comparison:
    """Measure ``original`` and ``compressed`` side by side on ``inputs``.

    ``inputs`` is one batch, given like ``example_inputs`` of
    :func:`fxcompress.run` (a tensor, a tuple, or a dict of keyword inputs):
    latency and MACs are measured on it.  ``data`` (batches like
    ``calibration_data``: a list or ``DataLoader``; ``(inputs, target)`` pairs
    are recognised) is what output agreement is measured over; without it,
    ``inputs`` alone.  For each thread count in ``threads`` the two models are
    timed in ``rounds`` alternating rounds of ``min_run_time / rounds``
    seconds each (the order flips every round); ``threads=()`` skips timing.
    MACs are counted on a shape-annotated graph (a model that is not a
    ``GraphModule`` is captured with :func:`fxcompress.trace`).  Both models
    must be in eval mode, since measuring a model in training mode would
    update its BatchNorm statistics.  With ``compiled=True`` both models are
    also timed under ``torch.compile`` (inductor, with freezing: weights are
    constants, packed once, as for deployment; a lowered model's int8 layers
    become direct oneDNN calls, :mod:`fxcompress.oplib.frozen`), reported as
    ``compiled_latency``.
    """
    args, kwargs = normalize_inputs(inputs)
    for role, model in (("original", original), ("compressed", compressed)):
        if not isinstance(model, nn.Module):
            raise InputError(f"compare(): {role} must be an nn.Module, got {type(model).__name__}")
        if model.training:
            raise InputError(f"compare(): the {role} model is in training mode; measuring it would "
                             f"update its BatchNorm statistics and randomise dropout: call .eval() first")
    if not all(isinstance(t, int) and t >= 1 for t in threads):
        raise InputError(f"compare(): threads must be positive integers, got {threads!r}")
    if min_run_time <= 0 or rounds < 1:
        raise InputError(f"compare(): min_run_time must be > 0 and rounds >= 1, got {min_run_time}, {rounds}")

    agree = _agreement_over(original, compressed, args, kwargs, data)
    notes = _output_warnings(agree)
    figures = [ModelFigures(weight_count(m), _macs(m, args, kwargs, notes, role), serialized_bytes(m))
               for m, role in ((original, "original"), (compressed, "compressed"))]
    for t, (lat_a, lat_b) in _latencies(original, compressed, args, kwargs, threads, min_run_time, rounds).items():
        figures[0].latency[t], figures[1].latency[t] = lat_a, lat_b
        if lat_b.median > lat_a.median:
            notes.append(f"the compressed model is slower than the original at {t} thread{'s' * (t > 1)}: "
                         f"{lat_b.median * 1e3:.3f} ms vs {lat_a.median * 1e3:.3f} ms "
                         f"(speedup {lat_a.median / lat_b.median:.2f}x)")
    if compiled and threads:
        fast = [_compiled_frozen(m, args, kwargs) for m in (original, compressed)]
        for t, (lat_a, lat_b) in _latencies(*fast, args, kwargs, threads, min_run_time, rounds).items():
            figures[0].compiled_latency[t], figures[1].compiled_latency[t] = lat_a, lat_b
    if eval_fn is not None:
        figures[0].metric, figures[1].metric = float(eval_fn(original)), float(eval_fn(compressed))
    for note in notes:
        warnings.warn(f"fxcompress.bench.compare: {note}", UserWarning, stacklevel=2)
    return Comparison(figures[0], figures[1], agree.result(), tuple(threads), notes)


def _run(model: nn.Module, role: str, args: tuple, kwargs: dict, where: str) -> Any:
    """One call on copies of the inputs; a model that does not run on them is an InputError."""
    try:
        with torch.inference_mode():
            return model(*clone_inputs(args), **clone_inputs(kwargs))
    except FxCompressError:
        raise
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise InputError(f"compare(): the {role} model does not run on {where}: {type(exc).__name__}: "
                         f"{first}; check their shape, dtype and number") from exc


def _agreement_over(original: nn.Module, compressed: nn.Module, args: tuple, kwargs: dict,
                    data: Iterable | None) -> "_Agreement":
    agree = _Agreement()
    if data is None:
        ref = _run(original, "original", args, kwargs, "the inputs")
        agree.add(ref, _run(compressed, "compressed", args, kwargs, "the inputs"))
        return agree
    from .quant.calibration import batch_inputs  # how a batch of data becomes model inputs

    for index, item in enumerate(data):
        try:
            b_args, b_kwargs = batch_inputs(item, index, args, kwargs)
        except InputError as exc:
            raise InputError(f"compare(): data: {exc}") from exc
        where = f"data batch {index}"
        agree.add(_run(original, "original", b_args, b_kwargs, where),
                  _run(compressed, "compressed", b_args, b_kwargs, where))
    if agree.batches == 0:
        raise InputError("compare(): data is empty; give at least one batch (or leave data out)")
    return agree


# Top-1 agreement over fewer rows than this says little: a warning suggests more data.
_FEW_ROWS = 32


def _output_warnings(agree: "_Agreement") -> list[str]:
    notes = []
    g = agree.result()
    if g.top1_agreement is not None and g.rows < _FEW_ROWS:
        notes.append(f"top-1 agreement is over {g.rows} row{'s' * (g.rows != 1)} only; give data=[batch, ...] "
                     f"for a figure that means something")
    notes.extend(agree.problems)
    return notes


class _Agreement:
    """Signal, noise, maximum error and argmax matches, accumulated over batches."""

    def __init__(self) -> None:
        self.signal = self.noise = self.max_abs = 0.0
        self.matches = self.rows = self.batches = 0
        self.classifier: bool | None = None
        self.problems: list[str] = []

    def add(self, reference: Any, output: Any) -> None:
        ref, out = _tensor_leaves(reference), _tensor_leaves(output)
        if len(ref) != len(out) or any(a.shape != b.shape for a, b in zip(ref, out)):
            raise InputError(f"the two models' outputs differ in structure: "
                             f"{[tuple(a.shape) for a in ref]} vs {[tuple(b.shape) for b in out]}")
        self.batches += 1
        for i, (a, b) in enumerate(zip(ref, out)):
            if not (a.is_floating_point() or b.is_floating_point()):
                continue
            a64, b64 = a.double(), b.double()
            self.signal += a64.square().sum().item()
            self.noise += (a64 - b64).square().sum().item()
            if a.numel():
                self.max_abs = max(self.max_abs, (a64 - b64).abs().max().item())
            self._check(i, a64, b64)
        classifier = bool(ref) and ref[0].dim() == 2 and ref[0].shape[1] > 1 and ref[0].is_floating_point()
        self.classifier = classifier if self.classifier is None else self.classifier and classifier
        if classifier:
            self.matches += int((ref[0].argmax(1) == out[0].argmax(1)).sum())
            self.rows += ref[0].shape[0]

    def _check(self, index: int, a: torch.Tensor, b: torch.Tensor) -> None:
        where = f"output #{index}"
        if bool(torch.isfinite(a).all()) and not bool(torch.isfinite(b).all()):
            message = f"the compressed model's {where} holds NaN or Inf where the original's is finite"
        elif a.numel() > 1 and a.std().item() > 0 and b.std().item() <= 1e-6 * a.std().item():
            message = (f"the compressed model's {where} collapsed to a constant ({b.reshape(-1)[0].item() + 0.0:.4g}) "
                       f"where the original's varies (std {a.std().item():.4g})")
        else:
            return
        if message not in self.problems:
            self.problems.append(message)

    def result(self) -> Agreement:
        sqnr = math.inf if self.noise == 0 else (10 * math.log10(self.signal / self.noise) if self.signal
                                                 else -math.inf)
        top1 = self.matches / self.rows if self.classifier and self.rows else None
        return Agreement(sqnr, self.max_abs, top1, self.rows if top1 is not None else 0, self.batches)


def serialized_bytes(model: nn.Module) -> int:
    """Size of ``torch.save(model.state_dict())``.

    Caches that lowered modules keep outside their state dict (prepacked
    kernel weights) are rebuilt on load and therefore not counted.
    """
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def agreement(reference: Any, output: Any) -> Agreement:
    """Compare two (nested) model outputs of the same structure; see :class:`Agreement`."""
    agree = _Agreement()
    agree.add(reference, output)
    return agree.result()


def _tensor_leaves(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value.detach()]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensor_leaves(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensor_leaves(v)]
    return []


def _macs(model: nn.Module, args: tuple, kwargs: dict, notes: list[str], role: str) -> int:
    """MACs on a shape-annotated graph, without touching ``model``'s own graph metadata;
    modules the count leaves out are added to ``notes``."""
    from .macs import count_macs, uncounted

    if isinstance(model, fx.GraphModule):
        # A private graph copy: re-annotating shapes must not rewrite the caller's node.meta.
        gm = fx.GraphModule(model, copy.deepcopy(model.graph), type(model).__name__)
        propagate_shapes(gm, args, kwargs)
    else:
        gm = trace(model, kwargs or args)  # normalize_inputs yields args or kwargs, never both
    notes.extend(f"the {role} model's MACs leave out node {node!r}: {why}" for node, why in uncounted(gm).items())
    return count_macs(gm)


def _latencies(a: nn.Module, b: nn.Module, args: tuple, kwargs: dict, threads: tuple[int, ...],
               min_run_time: float, rounds: int) -> dict[int, tuple[Latency, Latency]]:
    saved = torch.get_num_threads()
    results = {}
    try:
        for t in threads:
            torch.set_num_threads(t)
            calls = [_caller(m, args, kwargs) for m in (a, b)]
            for call in calls:  # warm-up: lazily built kernel caches, allocator, first-call paths
                call()
            timers = [Timer("call()", globals={"call": c}, num_threads=t) for c in calls]
            measured: list[list[Measurement]] = [[], []]
            for r in range(rounds):
                order = (0, 1) if r % 2 == 0 else (1, 0)  # flip so neither model always runs first
                for i in order:
                    measured[i].append(timers[i].blocked_autorange(min_run_time=min_run_time / rounds))
            merged = [Measurement.merge(ms)[0] for ms in measured]
            results[t] = tuple(Latency(t, m.median, m.iqr, len(m.times)) for m in merged)
    finally:
        torch.set_num_threads(saved)
    return results


def _compiled_frozen(model: nn.Module, args: tuple, kwargs: dict) -> nn.Module:
    """``torch.compile(model)``, compiled now with inductor's freezing, in inference mode (where
    it is timed: a call in another grad mode would compile again, without freezing)."""
    import torch._inductor.config as inductor_config

    fast = torch.compile(model)
    with inductor_config.patch(freezing=True), torch.inference_mode():
        fast(*clone_inputs(args), **clone_inputs(kwargs))
    return fast


def _caller(model: nn.Module, args: tuple, kwargs: dict) -> Callable[[], Any]:
    args, kwargs = clone_inputs(args), clone_inputs(kwargs)  # a model may write into its inputs: not the caller's

    def call() -> Any:
        with torch.inference_mode():
            return model(*args, **kwargs)

    return call


def _ms(lat: Latency) -> str:
    return f"{lat.median * 1e3:.3f} ms ± {lat.iqr * 1e3:.3f}"


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"
