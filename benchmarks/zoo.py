"""The torchvision classification zoo through every issue's flow, checked in full.

Each of the 80 classifiers (``fxcompress.zoo``: realistic random weights, seed 0)
goes through up to five sections, each ``fxcompress.run(..., check="full")``:

- ``foundation``: ``fuse_conv_bn`` + ``eliminate_dead_nodes``: nodes, parameters
  and MACs before/after, the output's norm-relative error against the original
  (and the float32 model's own error against float64, which sets the exactness
  tolerance as in tests/zoo), and whether the caller's model was left untouched.
- ``prune``: ``prune_channels`` (L2) at ratios 0.3 and 0.5: parameter and MACs
  ratios, frozen units and the most common reason besides the model output,
  and a forward of the pruned model (output shape kept, finite).
- ``quant``: ``fuse_conv_bn -> insert_observers -> calibrate ->
  fold_fake_quant`` on a few calibration batches: SQNR of the folded model
  against float on a held-out batch, finite outputs.
- ``lower``: ``recipes.int8_static()`` (the above + ``lower`` +
  ``eliminate_dead_nodes``): state size and latency (1 thread, batch 1,
  ``torch.utils.benchmark``, interleaved) against the float model, SQNR, and
  the int8 / float / reference-fallback counts from the pass's stats.
- ``artifact``: ``fxcompress.artifact`` save and load of the fused, pruned
  (0.5) and lowered models: loaded outputs bit-identical, artifact bytes.

Every model runs in a child process (a crash, e.g. a segfault in a kernel or
running out of memory, is recorded as that model's failure, not the end of
the run) and writes one JSON entry per section to
``benchmarks/.cache/zoo/<section>/<model>.json``.  The tables in
``docs/benchmarks/zoo.md`` are rendered from that cache, so ``--resume``
continues an interrupted run and ``--render-only`` rewrites the page.  A
failure is never hidden: its exception type and first line stand in the
table, and the script exits with status 1 when any selected model failed.

Usage: ``python benchmarks/zoo.py [--section foundation|prune|quant|lower|artifact|all]
[--models NAME,...|ci|all] [--reduced] [--resume] [--render-only]``
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.benchmark import Timer

import fxcompress
from _common import ROOT, markdown_table, weights_for_this_cpu, write_section
from fxcompress import artifact, recipes, zoo
from fxcompress.api import state_hash
from fxcompress.bench import agreement
from fxcompress.quant.contract import check_contract
from fxcompress.report import state_bytes

CACHE = ROOT / "benchmarks" / ".cache" / "zoo"
SECTIONS = ("foundation", "prune", "quant", "lower", "artifact")
FOUNDATION = ["fuse_conv_bn", "eliminate_dead_nodes"]
QUANT = ["fuse_conv_bn", "insert_observers", "calibrate", "fold_fake_quant"]
PRUNE_RATIOS = (0.3, 0.5)
TOLERANCE = 1e-4  # the Foundation's exactness bound (widened to 3x a model's own float32 error)
# Beyond this own float32 error (vs float64) a model's output is round-off noise: no check means much.
ILL_CONDITIONED = 1e-2
CALIBRATION_BATCHES = 3
LATENCY_ROUNDS = 4  # alternating rounds per model, order flipped each round
LATENCY_SECONDS = 0.25  # minimum run time of one round
OUTPUT_REASON = "model output"  # the frozen reason every classifier has (its logits)

Row = dict[str, Any]
UNFINISHED = (None, "pending", "running")  # cache states of a section whose worker has not finished it


# --- one model, built once per worker -------------------------------------------------


class Workbench:
    """A zoo model, its inputs, and the pipeline results later sections reuse.

    ``keep`` holds the ``fused`` / ``pruned`` / ``lowered`` models only when
    the artifact section runs in the same worker: large models must not be
    kept alive longer than needed.
    """

    def __init__(self, name: str, reduced: bool, batch: int, keep: bool) -> None:
        start = time.perf_counter()
        self.name, self.reduced = name, reduced
        self.model = zoo.build(name, seed=0)
        self.build_seconds = time.perf_counter() - start
        self.x = zoo.example_input(name, batch=batch, reduced=reduced, seed=0)
        self.keep = keep
        self.kept: dict[str, nn.Module] = {}
        self._expected: torch.Tensor | None = None
        self._own_error: float | None = None

    @property
    def expected(self) -> torch.Tensor:
        """The float model's output on ``x`` (computed once)."""
        if self._expected is None:
            with torch.no_grad():
                self._expected = self.model(self.x)
        return self._expected

    @property
    def own_error(self) -> float:
        """The float32 model's norm-relative error against its float64 forward on ``x`` (computed once).

        Deep nets amplify round-off (resnet152: 3e-4 at 224 px), so exact passes are
        checked at :attr:`tolerance`, as tests/zoo does.  ``.double()`` then
        ``.float()`` restores every weight bit for bit.
        """
        if self._own_error is None:
            try:
                with torch.no_grad():
                    exact = self.model.double()(self.x.double())
            finally:
                self.model.float()
            self._own_error = rel_err(exact, self.expected)
        return self._own_error

    @property
    def tolerance(self) -> float:
        """The bound for exact passes: max(1e-4, 3x the model's own float32 error)."""
        return max(TOLERANCE, 3 * self.own_error)

    def calibration(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Calibration batches (seeds 1..) and a held-out batch (seed 100), batch 2 each."""
        def make(seed: int) -> torch.Tensor:
            return zoo.example_input(self.name, batch=2, reduced=self.reduced, seed=seed)

        return [make(s + 1) for s in range(CALIBRATION_BATCHES)], make(100)

    def store(self, key: str, model: nn.Module) -> None:
        if self.keep:
            self.kept[key] = model


def fingerprint(model: nn.Module) -> tuple[str, list[tuple[str, str, bool]]]:
    """What run() promises not to touch: the state (bit-exact hash), structure and training flags."""
    return state_hash(model), [(n, type(m).__name__, m.training) for n, m in model.named_modules()]


def rel_err(reference: torch.Tensor, value: torch.Tensor) -> float:
    """‖reference − value‖ / ‖reference‖ in float64."""
    ref = reference.double()
    return ((ref - value.double()).norm() / ref.norm()).item()


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (the table's failure cell)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".strip()


def attempt(row: Row, label: str, fn: Callable[[], Any]) -> Any:
    """``fn()``, or None with the failure appended to ``row["errors"]`` (and its traceback kept)."""
    try:
        return fn()
    except Exception as exc:  # recorded in the table and the cache, never swallowed
        row.setdefault("errors", []).append(f"{label}: {first_line(exc)}" if label else first_line(exc))
        row.setdefault("tracebacks", []).append(traceback.format_exc(limit=-12))
        return None


def flag_ill_conditioned(wb: Workbench, row: Row) -> None:
    """A failure when the float model's own round-off swamps its output: no figure would mean much."""
    if wb.own_error > ILL_CONDITIONED:
        row.setdefault("errors", []).append(
            f"ill-conditioned weights: the float32 original is {wb.own_error:.2g} (norm-relative) from "
            f"its float64 forward; outputs cannot be compared")


def run_full(wb: Workbench, passes: list, **kwargs: Any) -> fxcompress.Result:
    return fxcompress.run(wb.model, passes, wb.x, check="full", progress=False, tolerance=wb.tolerance, **kwargs)


# --- sections: each returns a row of raw figures (formatted by the renderer) ---------


def foundation(wb: Workbench) -> Row:
    row: Row = {}
    tolerance = wb.tolerance  # before the fingerprint: it converts the model to float64 and back
    before = fingerprint(wb.model)
    start = time.perf_counter()
    result = run_full(wb, FOUNDATION)
    row["run_s"] = time.perf_counter() - start
    with torch.no_grad():
        got = result.model(wb.x)
    rep = result.report
    row.update(nodes=(rep.before.nodes, rep.after.nodes), params=(rep.before.parameters, rep.after.parameters),
               macs=(rep.before.macs, rep.after.macs), fused=rep.rows[0].stats.get("fused", 0),
               rel_err=rel_err(wb.expected, got), own_err=wb.own_error, tolerance=tolerance,
               untouched=fingerprint(wb.model) == before)
    if row["rel_err"] > tolerance:
        row.setdefault("errors", []).append(f"outputs differ: rel err {row['rel_err']:.2e} > {tolerance:.1e}")
    if not row["untouched"]:
        row.setdefault("errors", []).append("the caller's model was modified")
    flag_ill_conditioned(wb, row)
    wb.store("fused", result.model)
    return row


def _prune_once(wb: Workbench, ratio: float) -> Row:
    start = time.perf_counter()
    result = run_full(wb, [("prune_channels", {"ratio": ratio})])
    seconds = time.perf_counter() - start
    with torch.no_grad():
        out = result.model(wb.x)
    if out.shape != wb.expected.shape or not torch.isfinite(out).all():
        raise AssertionError(f"pruned forward: shape {tuple(out.shape)} (expected "
                             f"{tuple(wb.expected.shape)}), finite {bool(torch.isfinite(out).all())}")
    rep, stats = result.report, result.report.rows[0].stats
    frozen = stats.get("frozen", {})
    reasons: dict[str, int] = {}  # the node-specific prefix ("X at node n: ") dropped: one count per kind
    for reason, n in frozen.items():
        if not reason.startswith(OUTPUT_REASON):
            kind = reason.split(": ", 1)[-1]
            reasons[kind] = reasons.get(kind, 0) + n
    top = max(reasons.items(), key=lambda kv: kv[1]) if reasons else None
    if ratio == max(PRUNE_RATIOS):
        wb.store("pruned", result.model)
    return {"params": rep.after.parameters / rep.before.parameters, "macs": rep.after.macs / rep.before.macs,
            "units": stats.get("units", 0), "frozen": sum(frozen.values()),
            "top_reason": f"{top[1]}: {top[0]}" if top else "none", "frozen_by_reason": frozen,
            "seconds": seconds}


def prune(wb: Workbench) -> Row:
    row: Row = {"ratios": {}}
    for ratio in PRUNE_RATIOS:
        figures = attempt(row, f"ratio {ratio}", lambda: _prune_once(wb, ratio))
        if figures is not None:
            row["ratios"][str(ratio)] = figures
    row["run_s"] = sum(f["seconds"] for f in row["ratios"].values())
    return row


def quant(wb: Workbench) -> Row:
    calibration, held_out = wb.calibration()
    start = time.perf_counter()
    result = run_full(wb, QUANT, calibration_data=calibration)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        expected, got = wb.model(held_out), result.model(held_out)
    observe = result.report.rows[1].stats
    row: Row = {"run_s": seconds, "layers": observe.get("layers_quantized", 0),
                "kept_float": len(observe.get("kept_float", {})), "finite": bool(torch.isfinite(got).all()),
                "sqnr": agreement(expected, got).sqnr_db,
                "state": result.report.after.state_bytes / result.report.before.state_bytes}
    if not row["finite"]:
        row.setdefault("errors", []).append("non-finite outputs")
    flag_ill_conditioned(wb, row)
    return row


def _latency(models: list[nn.Module], x: torch.Tensor) -> list[float]:
    """Median seconds per call of each model, 1 thread, timed in alternating rounds."""
    calls = []
    for model in models:
        def call(model: nn.Module = model) -> None:
            with torch.inference_mode():
                model(x)
        call()  # warm-up: kernel caches and first-call paths
        calls.append(call)
    timers = [Timer("call()", globals={"call": c}, num_threads=1) for c in calls]
    times: list[list[float]] = [[] for _ in models]
    for r in range(LATENCY_ROUNDS):
        order = range(len(models)) if r % 2 == 0 else reversed(range(len(models)))
        for i in order:
            times[i].extend(timers[i].blocked_autorange(min_run_time=LATENCY_SECONDS).times)
    return [sorted(t)[len(t) // 2] for t in times]


def lower(wb: Workbench) -> Row:
    calibration, held_out = wb.calibration()
    _, weights = weights_for_this_cpu()  # the weights this CPU's int8 kernels take (7-bit on AVX2)
    # keep_float: where the whole int8 model is slower here, lower returns its float version.
    recipe = recipes.int8_static(weights=weights, if_slower="keep_float")
    fold, rest = recipe[:len(QUANT)], recipe[len(QUANT):]  # split after fold_fake_quant, to score lowering
    start = time.perf_counter()
    folded = run_full(wb, fold, calibration_data=calibration).model
    result = fxcompress.run(folded, rest, wb.x, check="full", progress=False, tolerance=wb.tolerance)
    seconds = time.perf_counter() - start
    gm = result.model
    with torch.no_grad():
        expected, got, reference = wb.model(held_out), gm(held_out), folded(held_out)
    stats = next(r.stats for r in result.report.rows if r.name == "lower")
    contract = check_contract(gm, held_out)
    x1 = wb.x[:1]
    float_s, int8_s = _latency([wb.model, gm], x1)
    row: Row = {"run_s": seconds, "int8_nodes": stats.get("int8_nodes", 0),
                "float_nodes": len(stats.get("float_nodes", {})), "fallbacks": len(stats.get("fallbacks", [])),
                "size": state_bytes(gm) / state_bytes(wb.model), "float_ms": float_s * 1e3,
                "int8_ms": int8_s * 1e3, "sqnr": agreement(expected, got).sqnr_db,
                "fidelity": agreement(reference, got).sqnr_db, "contract": contract.holds,
                "differing": list(contract.differing_codes()), "choices": stats.get("choices", {}),
                "finite": bool(torch.isfinite(got).all()), "checked_whole_model": True,
                "kept_float": stats.get("kept_float")}
    if row["kept_float"]:  # the int8 model was discarded: show what it had
        row["int8_nodes"] = row["kept_float"]["discarded"]["int8_nodes"]
    if not contract.holds:
        row.setdefault("errors", []).append(f"per-op contract broken: {contract.summary()}")
    if not row["finite"]:
        row.setdefault("errors", []).append("non-finite outputs")
    flag_ill_conditioned(wb, row)
    wb.store("lowered", gm)
    return row


def _round_trip(model: nn.Module, x: torch.Tensor, directory: Path, label: str) -> dict[str, Any]:
    path = directory / f"{label}.fxc"
    artifact.save(model, path, overwrite=True)
    loaded = artifact.load(path)
    with torch.no_grad():
        equal = torch.equal(model(x), loaded(x))
    size = path.stat().st_size
    path.unlink()
    if not equal:
        raise AssertionError("loaded outputs differ from the saved model's")
    return {"bytes": size, "equal": equal}


def artifacts(wb: Workbench) -> Row:
    """Round trips of the models earlier sections made in this worker (rebuilt here when absent)."""
    makers: dict[str, Callable[[], nn.Module]] = {
        "fused": lambda: run_full(wb, FOUNDATION).model,
        "pruned": lambda: run_full(wb, [("prune_channels", {"ratio": max(PRUNE_RATIOS)})]).model,
        "lowered": lambda: run_full(wb, recipes.int8_static(), calibration_data=wb.calibration()[0]).model,
    }
    row: Row = {"models": {}}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fxc-zoo-") as tmp:
        for label, make in makers.items():
            model = wb.kept.pop(label, None)
            if model is None:
                model = attempt(row, f"{label} (building)", make)
            if model is None:
                continue
            figures = attempt(row, label, lambda: _round_trip(model, wb.x, Path(tmp), label))
            if figures is not None:
                row["models"][label] = figures
            del model
            gc.collect()
    row["run_s"] = time.perf_counter() - start
    return row


RUNNERS: dict[str, Callable[[Workbench], Row]] = {
    "foundation": foundation, "prune": prune, "quant": quant, "lower": lower, "artifact": artifacts,
}
_LOWERING = set(QUANT) | {"lower", "eliminate_dead_nodes"}
PASSES_NEEDED = {"quant": set(QUANT), "lower": _LOWERING, "artifact": _LOWERING | {"prune_channels"}}


def missing_passes(section: str) -> list[str]:
    return sorted(PASSES_NEEDED.get(section, set()) - set(fxcompress.available_passes()))


# --- the cache ------------------------------------------------------------------------


def cache_path(section: str, name: str) -> Path:
    return CACHE / section / f"{name}.json"


def resolution(reduced: bool) -> str:
    return "reduced" if reduced else "standard"


def read_entries(section: str, name: str) -> dict[str, Row]:
    """``{"standard": entry, "reduced": entry}`` (either may be absent)."""
    path = cache_path(section, name)
    return json.loads(path.read_text()) if path.exists() else {}


def write_entry(section: str, name: str, reduced: bool, entry: Row) -> None:
    entries = read_entries(section, name)
    entries[resolution(reduced)] = entry
    path = cache_path(section, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(entries, indent=1, default=str))
    tmp.replace(path)


def cached(section: str, name: str, reduced: bool) -> Row | None:
    return read_entries(section, name).get(resolution(reduced))


# --- the worker: one model, several sections, in a child process ----------------------


def work(name: str, sections: list[str], reduced: bool, batch: int) -> None:
    """Run ``sections`` on ``name``, writing each entry as soon as it is known.

    Every section is marked ``pending`` first and ``running`` when it starts:
    if the process dies, the parent turns those markers into failures.
    """
    base = {"model": name, "reduced": reduced, "batch": batch,
            "input": "x".join(map(str, zoo.input_shape(name, reduced=reduced)))}
    for section in sections:
        write_entry(section, name, reduced, {**base, "status": "pending"})
    failure: Row = {}
    bench = attempt(failure, "build", lambda: Workbench(name, reduced, batch, keep="artifact" in sections))
    for section in sections:
        write_entry(section, name, reduced, {**base, "status": "running"})
        entry: Row = {**base, "when": time.strftime("%Y-%m-%d %H:%M")}
        if bench is None:
            entry.update(status="failed", row=failure)
        else:
            entry["build_s"] = bench.build_seconds
            row: Row = {}
            result = attempt(row, "", lambda: RUNNERS[section](bench))
            row = {**row, **(result or {})}
            entry.update(status="failed" if row.get("errors") else "ok", row=row)
        write_entry(section, name, reduced, entry)
        gc.collect()


def spawn(name: str, sections: list[str], args: argparse.Namespace) -> int:
    """Run :func:`work` in a child process; a crash becomes a failed entry per unfinished section."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--section", ",".join(sections),
           "--batch", str(args.batch), "--threads", str(args.threads)] + (["--reduced"] if args.reduced else [])
    code = subprocess.run(cmd).returncode
    how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
    how += " (SIGKILL: most likely out of memory)" if code == -9 else ""
    for section in sections:
        entry = cached(section, name, args.reduced) or {"model": name, "reduced": args.reduced}
        if entry.get("status") in UNFINISHED:
            where = "in this section" if entry.get("status") == "running" else "before this section ran"
            write_entry(section, name, args.reduced, {**entry, "status": "failed", "row": {
                "errors": [f"crashed: the worker process died {where} ({how})"]}})
    return code


# --- rendering ------------------------------------------------------------------------


def _g(n: float) -> str:
    return f"{n / 1e9:.3g}"


def _m(n: float) -> str:
    return f"{n / 1e6:.3g}"


def _db(v: float | None) -> str:
    return "-" if v is None else ("inf" if math.isinf(v) and v > 0 else f"{v:.1f}")


def _status(entry: Row) -> str:
    if entry["status"] == "ok":
        return "OK"
    errors = entry.get("row", {}).get("errors", ["unknown failure"])
    text = "; ".join(errors)
    return "**FAIL** " + (text[:160] + "…" if len(text) > 160 else text).replace("|", "\\|")


def _cells(section: str, r: Row) -> list[Any]:
    """The table cells of one row's figures ("-" where a failure left them out)."""
    get = lambda key, fmt: fmt(r[key]) if key in r else "-"  # noqa: E731
    pair = lambda key, fmt: f"{fmt(r[key][0])} → {fmt(r[key][1])}" if key in r else "-"  # noqa: E731
    if section == "foundation":
        return [pair("nodes", str), pair("params", _m), pair("macs", _g), get("fused", str),
                get("rel_err", "{:.1e}".format), get("own_err", "{:.1e}".format),
                get("untouched", lambda v: "yes" if v else "**no**")]
    if section == "prune":
        cells = []
        for ratio in PRUNE_RATIOS:
            f = r.get("ratios", {}).get(str(ratio))
            cells += [f"{f['params']:.3f}", f"{f['macs']:.3f}"] if f else ["-", "-"]
        last = r.get("ratios", {}).get(str(max(PRUNE_RATIOS)))
        return cells + ([f"{last['frozen']} / {last['units']}", last["top_reason"].replace("|", "\\|")[:90]]
                        if last else ["-", "-"])
    if section == "quant":
        return [get("layers", str), get("kept_float", str), get("sqnr", _db), get("state", "{:.3f}".format),
                get("finite", lambda v: "yes" if v else "**no**")]
    if section == "lower":
        latency = (f"{r['int8_ms'] / r['float_ms']:.2f} ({r['float_ms']:.1f} → {r['int8_ms']:.1f} ms)"
                   if "int8_ms" in r else "-")
        contract = (("holds" if r["contract"] else "**broken**") + f" ({r['differing'][0]} / {r['differing'][1]})"
                    if "contract" in r else "-")
        kept = r.get("choices", {}).get("float", "-") if "choices" in r else "-"
        return [get("int8_nodes", str), get("float_nodes", str), kept, get("fallbacks", str),
                _outcome(r), get("size", "{:.3f}".format), latency, get("sqnr", _db), contract,
                get("fidelity", _db)]
    models = r.get("models", {})
    return [f"{models[k]['bytes'] / 2**20:.1f} MiB, equal" if k in models else "-"
            for k in ("fused", "pruned", "lowered")]


def _outcome(r: Row) -> str:
    """What ``lower(if_slower="keep_float")`` returned: int8, or float with the int8 model's speed."""
    if not r.get("checked_whole_model"):
        return "int8 (no whole-model check)"
    kept = r.get("kept_float")
    if not kept:
        return "int8"
    return f"float (int8 was {kept['lowered_ms'] / kept['float_ms']:.2f}x)"


HEADERS = {
    "foundation": ["nodes", "params (M)", "MACs (G)", "BN fused", "rel err", "fp32 vs fp64", "caller untouched"],
    "prune": [f"{k} @{r}" for r in PRUNE_RATIOS for k in ("params", "MACs")]
    + [f"frozen units @{max(PRUNE_RATIOS)}", "most frozen, besides the output"],
    "quant": ["int8 layers", "kept float", "SQNR dB", "state ratio", "finite"],
    "lower": ["int8 nodes", "float layers", "kept float (faster)", "ref. fallbacks", "model returned", "size ratio",
              "latency ratio (float → int8)", "SQNR dB", "per-op contract (codes differing)", "vs folded dB"],
    "artifact": ["fused", "pruned @0.5", "lowered int8"],
}

INTRO = {
    "foundation": "`fuse_conv_bn` + `eliminate_dead_nodes`, `check=\"full\"`. Nodes, "
                  "parameters and MACs (`fxcompress.macs`) before → after; rel err: ‖fused − original‖ / "
                  "‖original‖; fp32 vs fp64: the original's own float32 round-off (the exactness "
                  "tolerance is max(1e-4, 3x that)); caller untouched: state hash, structure and "
                  "training flags equal after the run.",
    "prune": "`prune_channels` (L2, uniform) at 0.3 and 0.5, `check=\"full\"`: parameters and MACs "
             "after / before; frozen units / all units at 0.5 (the 1000 logits are always frozen) and "
             "the most frequent other reason. Every pruned model ran forward with its output shape kept.",
    "quant": "`fuse_conv_bn → insert_observers → calibrate → fold_fake_quant`, `check=\"full\"`, "
             f"{CALIBRATION_BATCHES} calibration batches of 2 (seeds 1..{CALIBRATION_BATCHES}); SQNR of "
             "the folded model against float on a held-out batch of 2 (seed 100); state ratio: state "
             "bytes after / before. Exact passes are checked at the foundation's tolerance. Inputs are "
             "N(0, 1) noise and weights random, so SQNR is lower than on trained models with real images.",
    "lower": "`recipes.int8_static(weights=..., if_slower=\"keep_float\")` (fuse, observe, calibrate, fold, "
             "`lower` with its measured per-layer choices and its whole-model check, dead-node elimination) with the weights this CPU's int8 kernels take (8-bit where they "
             "multiply exactly, 7-bit `portable_weight_spec` on AVX2), `check=\"full\"`, calibration as above. "
             "int8 nodes / float layers (quantized layers not int8; of those, kept float because float was "
             "faster here) / reference fallbacks from the `lower` stats; model returned: int8, or the float "
             "model where the whole int8 model was slower than it here (with that ratio; the int8 counts are "
             "then those discarded; rows marked \"no whole-model check\" were measured before the check "
             "existed); size ratio: state bytes int8 / float "
             "(the float model's state includes GoogLeNet's and Inception's auxiliary heads, which the "
             "eval forward never reaches and dead-node elimination drops); "
             "latency ratio: int8 / the float eager model, 1 thread, batch 1, median of "
             f"`torch.utils.benchmark` over {LATENCY_ROUNDS} interleaved rounds; SQNR on the held-out batch "
             "against float; the per-op contract (`check_contract` on the held-out batch: every x86 op within "
             "one code of its reference twin) with the codes that differ; SQNR against the folded graph the "
             "lowering started from (measured, not promised: a code can grow through a random-weight net).",
    "artifact": "`fxcompress.artifact.save` / `load` of the fused, pruned (0.5) and lowered models: "
                "artifact size; \"equal\" means the loaded model's outputs are bit-identical "
                "(`torch.equal`) to the saved model's.",
}


def render_section(section: str, names: list[str]) -> tuple[str, int, int]:
    """(markdown, ok count, failed count) over the cached entries of ``names``."""
    rows, ok, failed, seconds, batches = [], 0, 0, 0.0, set()
    for name in sorted(names):
        entries = read_entries(section, name)
        finished = [e for e in (entries.get("standard"), entries.get("reduced"))
                    if e and e.get("status") not in UNFINISHED]
        if not finished:
            continue
        entry = finished[0]
        r = entry.get("row", {})
        seconds += r.get("run_s", 0.0)
        batches.add(entry.get("batch"))
        ok, failed = ok + (entry["status"] == "ok"), failed + (entry["status"] != "ok")
        size = entry.get("input", "?").rpartition("x")[2]
        seconds_cell = f"{r['run_s']:.1f}" if "run_s" in r else "-"
        rows.append([name, size, *_cells(section, r), seconds_cell, _status(entry)])
    headers = ["model", "px", *HEADERS[section], "run s", "status"]
    summary = (f"{ok + failed} of {len(names)} models measured: **{ok} OK, {failed} failed**; "
               f"{seconds / 60:.1f} min in the pipelines; example input batch "
               f"{', '.join(map(str, sorted(b for b in batches if b is not None))) or '-'}.")
    body = f"### {section}\n\n{INTRO[section]}\n\n{summary}\n\n"
    return body + (markdown_table(rows, headers) if rows else "_Not run yet._"), ok, failed


KEPT_NOTE = ("_Kept from an earlier render: this machine's cache has no rows for this section, so its "
             "figures come from the run the page showed before (see that run's CPU in the git history)._")


def _previous_sections() -> dict[str, str]:
    """The ``### section`` texts of the page as it stands (to keep those without cached rows)."""
    path = Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / "zoo.md"
    if not path.exists():
        return {}
    found = {}
    for chunk in path.read_text().split("\n### ")[1:]:
        section = chunk.split("\n", 1)[0].strip()
        if section in SECTIONS and "_Not run yet._" not in chunk:
            found[section] = "### " + chunk.rstrip()
    return found


def render() -> tuple[dict[str, tuple[int, int]], Path]:
    """Write docs/benchmarks/zoo.md from the whole cache; (ok, failed) per section."""
    names = zoo.list_classifiers()
    parts, totals = [], {}
    previous = _previous_sections()
    for section in SECTIONS:
        text, ok, failed = render_section(section, names)
        if ok + failed == 0 and section in previous:
            # No cached rows here (the cache is per machine): keep what the page already showed.
            text = previous[section]
            if KEPT_NOTE not in text:
                text = text.replace("\n\n", f"\n\n{KEPT_NOTE}\n\n", 1)
        parts.append(text)
        totals[section] = (ok, failed)
    preface = ("Every torchvision classifier (`fxcompress.zoo.build(name, seed=0)`: realistic random "
               "weights) through each issue's flow; px: input resolution (224 standard, 299 for "
               "inception_v3; `--reduced`: 64, 128 for inception_v3, ViT/Swin/MaxViT stay 224). "
               "A model's standard-resolution result is shown when there is one. Regenerate a section "
               "with `python benchmarks/zoo.py --section NAME --models all --resume`.")
    path = write_section("zoo", "The torchvision zoo", preface + "\n\n" + "\n\n".join(parts))
    return totals, path


# --- the driver -----------------------------------------------------------------------


def select_models(spec: str) -> list[str]:
    if spec == "all":
        names = zoo.list_classifiers()
    elif spec == "ci":
        names = zoo.ci_subset()
    else:
        names = [n.strip() for n in spec.split(",") if n.strip()]
        for n in names:
            zoo.input_shape(n)  # ConfigError, with close matches, for an unknown name
    return sorted(names, key=zoo.param_count)  # small first: a long run shows progress early


def select_sections(spec: str) -> list[str]:
    chosen = list(SECTIONS) if spec == "all" else [s.strip() for s in spec.split(",")]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"unknown section(s) {unknown}: choose from {', '.join(SECTIONS)} or all")
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", default="all",
                        help="foundation|prune|quant|lower|artifact|all (or a comma list)")
    parser.add_argument("--models", default="ci", help="NAME,...|ci|all (ci: fxcompress.zoo.ci_subset())")
    parser.add_argument("--reduced", action="store_true", help="reduced input resolution (zoo.input_shape)")
    parser.add_argument("--resume", action="store_true",
                        help="skip models whose section is cached (failures too: rerun those by name)")
    parser.add_argument("--render-only", action="store_true", help="only rewrite the page from the cache")
    parser.add_argument("--batch", type=int, default=1, help="batch of the example input")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (latency is always 1 thread)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sections = select_sections(args.section)
    if args.worker:
        work(args.worker, sections, args.reduced, args.batch)
        return

    models = [] if args.render_only else select_models(args.models)
    runnable = []
    for section in sections:
        missing = missing_passes(section)
        if missing:
            print(f"{section}: skipped: passes missing ({', '.join(missing)})")
        else:
            runnable.append(section)
    start = time.perf_counter()
    for i, name in enumerate(models, 1):
        todo = [s for s in runnable
                if not args.resume or (cached(s, name, args.reduced) or {}).get("status") in UNFINISHED]
        if not todo:
            continue
        t0 = time.perf_counter()
        code = spawn(name, todo, args)
        states = ", ".join(f"{s} {cached(s, name, args.reduced)['status']}" for s in todo)
        print(f"[{i}/{len(models)}] {name}: {states} ({time.perf_counter() - t0:.0f} s"
              f"{'' if code == 0 else f', worker exit {code}'})", flush=True)
    totals, path = render()
    print(f"wrote {path.relative_to(ROOT)} ({(time.perf_counter() - start) / 60:.1f} min)")
    failed = 0
    for section in sections:
        entries = [cached(section, n, args.reduced) for n in models]
        bad = [(n, e) for n, e in zip(models, entries) if e and e["status"] != "ok"]
        print(f"{section}: {totals[section][0]} OK, {totals[section][1]} failed in the table; "
              f"this selection: {len(bad)} failed")
        for n, e in bad:
            print(f"  {n}: {'; '.join(e.get('row', {}).get('errors', []))}")
        failed += len(bad)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
