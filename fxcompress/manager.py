"""PassManager: checks a pipeline before any work, then verifies after every pass.

Before any work (all :class:`ConfigError`): unknown pass names (with close
matches), unknown or ill-typed options (with the valid ones), options a pass
rejects (its ``__post_init__``, run again for pass objects, so a field forced
past it is caught), unmet ``requires``, a pass placed after one it must
precede (``runs_before``), a graph already past the stages a pass runs on
(``stages``), ``scope``/``skip`` patterns that match no module, an
``eval_only`` pass given a model with any module in training mode; and, from
the :class:`PassContext` (:meth:`PassManager.check_context`): a missing
input a pass ``needs`` (calibration data, ``loss_fn``, ...), a one-shot
iterator that several passes would read, a ``float32_only`` pass given a
model or inputs of another floating dtype.

After each pass, by ``check`` level:

``"none"``   ``graph.lint()``, one recompile, and shape propagation (later
             passes and the report need the shapes; a graph that no longer
             runs on the example inputs fails here).  Nothing is compared.
``"shapes"`` also: the output structure, shapes and dtypes are unchanged.
``"full"``   also: every node that computes a tensor kept true ``tensor_meta``
             through the pass (a rewrite copies the metadata of the node it
             replaces and annotates the nodes it creates); outputs of
             ``exact`` passes equal the previous outputs within ``tolerance``
             (norm-relative, per floating-point output); the stage invariants
             of :mod:`fxcompress.verify`.

After each pass, whatever the level, modules the pass added take the
train/eval mode of the module they replace (or of their parent), so a
rewrite of an eval-mode model stays in eval mode; and a pass's ``modified``
flag is kept only if the graph, its modules or its state visibly changed.

Any failure raises :class:`PassError` naming the pass, the passes before it,
and the reason; an fxcompress error the pass raises itself keeps its type and
gains the same prefix (the pass never names itself: see :mod:`fxcompress.pass_base`).
Every check is linear in the number of nodes (plus one pass over the state for
the finite-values invariant) and runs with the
cyclic garbage collector paused (:func:`~fxcompress.capture.gc_paused`), so
verification time grows linearly with the graph.  The defaults are
:func:`fxcompress.run`'s: ``check`` from :func:`check_level` (``$FXCOMPRESS_CHECK``, else
``"shapes"``), ``progress`` on.  Tests always run with ``check="full"``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Literal, Sequence, Union

import torch
from torch import fx

from . import boundary
from .capture import gc_paused, propagate_shapes
from .errors import ConfigError, FxCompressError, InputError, PassError
from .pass_base import (
    Pass, PassContext, PassResult, check_option_types, close_matches, module_path_of, name_the_pass, path_matches,
)
from .pass_effects import Fingerprints, align_new_modules
from .registry import get_pass
from .report import PassRow, Report, snapshot
from .verify import STAGES, stage_of, verify

__all__ = ["PassManager", "Step", "PipelineEntry", "Check", "CHECKS", "CHECK_ENV", "check_level", "HISTORY_KEY",
           "normalize_pipeline", "relative_error"]

PipelineEntry = Union[Pass, str, type, tuple]
Check = Literal["full", "shapes", "none"]
CHECKS: tuple[str, ...] = ("full", "shapes", "none")
#: The environment variable giving the check level when none is passed (tests set it to "full").
CHECK_ENV = "FXCOMPRESS_CHECK"
# gm.meta key listing the passes already run on a graph, so that `requires` holds across run() calls.
HISTORY_KEY = "fxcompress_history"


def check_level(check: str | None) -> Check:
    """The check level: the argument, else ``$FXCOMPRESS_CHECK``, else ``"shapes"`` (ConfigError
    for anything else); :class:`PassManager` and :func:`fxcompress.run` share this default."""
    if check is not None:
        if check not in CHECKS:
            raise ConfigError(f"check must be one of {CHECKS}, got {check!r}")
        return check  # type: ignore[return-value]
    level = os.environ.get(CHECK_ENV, "shapes")
    if level not in CHECKS:
        raise ConfigError(f"environment variable {CHECK_ENV}={level!r} is not a check level; "
                          f"use one of {CHECKS} or unset it")
    return level  # type: ignore[return-value]


@dataclass(frozen=True)
class Step:
    """One pipeline entry, resolved: the pass object and where it may act."""

    pass_: Pass
    scope: tuple[str, ...] = ()
    skip: tuple[str, ...] = ()

    def describe(self) -> dict[str, Any]:
        """``{"name", "options"[, "scope"][, "skip"]}``: the entry as a recipe would spell it."""
        d: dict[str, Any] = {"name": self.pass_.name, "options": self.pass_.options()}
        if self.scope:
            d["scope"] = list(self.scope)
        if self.skip:
            d["skip"] = list(self.skip)
        return d


def _patterns(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigError(f"{where} must be a module-name pattern or a list of them, got {value!r}")


def _resolve(entry: Any, options: dict[str, Any], i: int) -> Pass:
    """A pass object from a pipeline entry and its options."""
    if isinstance(entry, Pass):
        if options:
            raise ConfigError(f"entry {i}: give options to the pass object itself, not beside it: {options}")
        check_option_types(type(entry), entry.options())
        post_init = getattr(entry, "__post_init__", None)
        if post_init is not None:  # again: a field may have been forced past it (object.__setattr__)
            try:
                post_init()
            except ConfigError:
                raise
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"pass {entry.name!r}: invalid options {entry.options()}: {exc}") from exc
        return entry
    if isinstance(entry, str) or (isinstance(entry, type) and issubclass(entry, Pass)):
        cls = get_pass(entry) if isinstance(entry, str) else entry
        options = check_option_types(cls, options)
        try:
            return cls(**options)
        except ConfigError:
            raise
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"pass {cls.name!r}: invalid options {options}: {exc}") from exc
    raise ConfigError(
        f"entry {i} is {entry!r}: a pipeline entry is a pass object, a pass name or class, "
        f"or (name, {{options, 'scope': [...], 'skip': [...]}})"
    )


def normalize_pipeline(entries: Sequence[PipelineEntry]) -> list[Step]:
    """Resolve names and options into :class:`Step` objects; ConfigError on anything wrong."""
    if isinstance(entries, (str, Pass)) or not isinstance(entries, (list, tuple)):
        raise ConfigError(f"passes must be a list of pipeline entries, got {type(entries).__name__}")
    steps = []
    for i, entry in enumerate(entries):
        options: dict[str, Any] = {}
        if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], dict):
            entry, options = entry[0], dict(entry[1])
        scope = _patterns(options.pop("scope", None), f"entry {i}: scope")
        skip = _patterns(options.pop("skip", None), f"entry {i}: skip")
        steps.append(Step(_resolve(entry, options, i), scope, skip))
    return steps


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖a‖ in float64 (the absolute ‖a − b‖ when ‖a‖ is 0)."""
    a64, b64 = a.detach().double(), b.detach().double()
    denom = a64.norm().item()
    diff = (a64 - b64).norm().item()
    return diff / denom if denom else diff


def _flatten(value: Any, path: str = "out") -> list[tuple[str, Any]]:
    """Leaves of a nested output with their paths; containers recorded by type and keys/length."""
    if isinstance(value, torch.Tensor):
        return [(path, value)]
    if isinstance(value, dict):
        out: list[tuple[str, Any]] = [(path, ("dict", tuple(value.keys())))]
        for k, v in value.items():
            out += _flatten(v, f"{path}[{k!r}]")
        return out
    if isinstance(value, (tuple, list)):
        out = [(path, (type(value).__name__, len(value)))]
        for i, v in enumerate(value):
            out += _flatten(v, f"{path}[{i}]")
        return out
    return [(path, ("value", type(value).__name__))]


def _spec(leaves: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    return [(p, (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else v) for p, v in leaves]


def _first_line(exc: BaseException) -> str:
    # torch's lint errors end with the whole printed graph: keep the sentence that matters.
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


class PassManager:
    """Runs an ordered list of passes with verification after each one.

    The constructor resolves the pipeline (names, options) and raises
    ConfigError before any work; :meth:`validate` adds the checks that need
    the graph; :meth:`run` does both and then the passes.
    """

    def __init__(self, passes: Sequence[PipelineEntry], *, check: Check | None = None,
                 tolerance: float = 1e-3, progress: bool = True) -> None:
        check = check_level(check)
        if isinstance(tolerance, bool) or not (isinstance(tolerance, (int, float)) and tolerance >= 0):
            raise ConfigError(f"tolerance must be a non-negative number, got {tolerance!r}")
        self.steps = normalize_pipeline(passes)
        self.check = check
        self.tolerance = float(tolerance)
        self.progress = progress

    # -- before any work ---------------------------------------------------
    def check_context(self, ctx: PassContext, model: torch.nn.Module | None = None) -> None:
        """What the passes need from the run, checked before any work (ConfigError).

        Every input a pass ``needs`` is given; ``calibration_data`` is an
        iterable of batches, re-iterable when several passes read it; with a
        ``float32_only`` pass, ``model``'s floating state and the example
        inputs are float32.
        """
        readers = []
        for i, step in enumerate(self.steps):
            p = step.pass_
            for need in p.needs_after([s.pass_ for s in self.steps[:i]]):
                if getattr(ctx, need, None) is None:
                    raise ConfigError(f"pass {p.name!r} (entry {i}) needs {need}: "
                                      f"{boundary.NEED_HINTS.get(need, f'give {need}= to fxcompress.run')}")
                if need == "calibration_data":
                    readers.append(p.name)
        boundary.check_data(ctx.calibration_data, readers)
        strict = next((s.pass_ for s in self.steps if s.pass_.float32_only), None)
        if strict is not None:
            offender = boundary.first_non_float32(model, *ctx.example_inputs())
            if offender is not None:
                raise ConfigError(
                    f"pass {strict.name!r} quantizes float32 models, but {offender}: convert the model and "
                    f"inputs with .float() first (the cast pass can make the float parts half precision "
                    f"after lowering)"
                )

    def validate(self, gm: fx.GraphModule) -> None:
        """Everything that can be checked on the graph without running a pass (ConfigError)."""
        done = list(gm.meta.get(HISTORY_KEY, []))
        paths: set[str] | None = None
        training = next((name or "(root)" for name, m in gm.named_modules() if m.training), None)
        stage = stage_of(gm)
        for i, step in enumerate(self.steps):
            p = step.pass_
            missing = [r for r in p.requires if r not in done]
            if missing:
                raise ConfigError(
                    f"pass {p.name!r} (entry {i}) requires {missing} to run earlier in the pipeline; "
                    f"add {missing} before it (passes so far: {done or 'none'})"
                )
            if p.stages is not None and STAGES.index(stage) > max(STAGES.index(s) for s in p.stages):
                raise ConfigError(
                    f"pass {p.name!r} (entry {i}) runs on {'/'.join(p.stages)} graphs, but the graph is already "
                    f"{stage}; run it on the model before it was quantized"
                )
            late = [r for r in p.runs_before if r in done]
            if late:
                raise ConfigError(
                    f"pass {p.name!r} (entry {i}) must run before {late}, but comes after them; move it "
                    f"earlier in the pipeline (passes so far: {done})"
                )
            if p.eval_only and training is not None:
                raise ConfigError(
                    f"pass {p.name!r} (entry {i}) is only valid in eval mode, but module {training!r} of the "
                    f"model is in training mode; call model.eval() first"
                )
            if step.scope or step.skip:
                if paths is None:
                    paths = {name for name, _ in gm.named_modules()} | {module_path_of(n) for n in gm.graph.nodes}
                for kind, patterns in (("scope", step.scope), ("skip", step.skip)):
                    for pattern in patterns:
                        if not any(path_matches(path, pattern) for path in paths):
                            raise ConfigError(
                                f"pass {p.name!r} (entry {i}): {kind} pattern {pattern!r} matches no module"
                                f"{close_matches(pattern, sorted(paths))}"
                            )
            done += [p.name, *p.provides]

    # -- the run -------------------------------------------------------------
    def run(self, gm: fx.GraphModule, ctx: PassContext) -> tuple[fx.GraphModule, Report]:
        """Validate, then run every pass on ``gm`` (rewritten in place where passes do so).

        Returns the final graph and the report.  ``gm.meta[HISTORY_KEY]`` lists
        every pass run on the graph so far.
        """
        self.validate(gm)
        args, kwargs = ctx.example_inputs()
        with gc_paused():
            outputs = propagate_shapes(gm, args, kwargs)
            report = Report(before=snapshot(gm))
            from .macs import uncounted  # imported on use, as snapshot() does

            report.notes.extend(f"MACs leave out node {node!r}: {why}" for node, why in uncounted(gm).items())
        reference = _spec(_flatten(outputs))
        history = list(gm.meta.get(HISTORY_KEY, []))
        steps: Any = self.steps
        if self.progress:
            from tqdm.auto import tqdm

            steps = tqdm(self.steps, desc="fxcompress", unit="pass", leave=False)
        fingerprints = Fingerprints()
        for index, step in enumerate(steps):
            before = [s.pass_.name for s in self.steps[:index]]
            with gc_paused():
                modules_before = {name: m for name, m in gm.named_modules()}
                fingerprint = fingerprints(gm)
            start = time.perf_counter()
            result = self._call(step, before, gm, ctx)
            seconds = time.perf_counter() - start
            gm = result.gm
            with gc_paused():
                align_new_modules(gm, modules_before)
                modified = bool(result.modified) and fingerprints(gm) != fingerprint
                outputs = self._check(step, before, gm, ctx, outputs, reference)
                after = snapshot(gm)
            history += [step.pass_.name, *step.pass_.provides]
            gm.meta[HISTORY_KEY] = list(history)
            report.rows.append(PassRow(step.pass_.name, step.pass_.options(), after,
                                       seconds, modified, dict(result.stats)))
            report.notes.extend(f"{step.pass_.name}: {n}" for n in result.stats.get("notes", []))
        return gm, report

    def _call(self, step: Step, before: list[str], gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        """Run one pass with its scope set; any failure becomes an error naming it."""
        ctx.scope, ctx.skip = step.scope, step.skip
        try:
            result = step.pass_(gm, ctx)
        except FxCompressError as exc:
            raise name_the_pass(exc, self._where(step, before), step.pass_.name) from exc
        except Exception as exc:
            raise self._error(step, before, f"raised {type(exc).__name__}: {_first_line(exc)}") from exc
        finally:
            ctx.scope, ctx.skip = (), ()
        if not isinstance(result, PassResult):
            raise self._error(step, before,
                              f"returned {type(result).__name__} instead of a PassResult(gm, modified, stats)")
        if not isinstance(result.gm, fx.GraphModule):
            raise self._error(step, before, f"returned {type(result.gm).__name__}, not a GraphModule")
        return result

    @staticmethod
    def _where(step: Step, before: list[str]) -> str:
        after = f"after {', '.join(before)}" if before else "the first pass"
        return f"pass {step.pass_.name!r} ({after})"

    def _error(self, step: Step, before: list[str], reason: str) -> PassError:
        return PassError(f"{self._where(step, before)} failed: {reason}")

    def _check(self, step: Step, before: list[str], gm: fx.GraphModule, ctx: PassContext,
               previous: Any, reference: list) -> Any:
        """Verify ``gm`` after ``step``; return its outputs on the example inputs."""
        try:
            gm.graph.lint()
        except Exception as exc:
            raise self._error(step, before, f"the graph does not lint: {_first_line(exc)}") from exc
        gm.recompile()
        recorded = {n: n.meta.get("tensor_meta") for n in gm.graph.nodes} if self.check == "full" else {}
        args, kwargs = ctx.example_inputs()
        try:
            outputs = propagate_shapes(gm, args, kwargs)
        except InputError as exc:
            raise self._error(step, before, f"the rewritten graph no longer runs: {exc}") from exc
        if self.check == "none":
            return outputs
        if self.check == "full":
            self._compare_metadata(step, before, recorded)
        new = _flatten(outputs)
        if _spec(new) != reference:
            diff = [f"{p}: {a} -> {b}" for (p, a), (_, b) in zip(reference, _spec(new)) if a != b]
            raise self._error(step, before, "the output structure, shapes or dtypes changed: "
                              + ("; ".join(diff[:5]) or f"{len(reference)} -> {len(new)} leaves"))
        if self.check == "full":
            if step.pass_.exact:
                self._compare_values(step, before, _flatten(previous), new)
            stage, problems = verify(gm)
            if problems:
                raise self._error(step, before, f"{stage}-stage invariants broken: " + "; ".join(problems[:5]))
        return outputs

    def _compare_values(self, step: Step, before: list[str], old: list, new: list) -> None:
        """An exact pass keeps every floating-point output within ``tolerance`` (norm-relative).

        Non-finite outputs (a model may return -inf for masked positions) must
        stay where and what they were; the finite rest is compared.
        """
        for (path, a), (_, b) in zip(old, new):
            if isinstance(a, torch.Tensor) and a.is_floating_point():
                finite = torch.isfinite(a)
                if not bool(finite.all()):
                    same = torch.equal(finite, torch.isfinite(b)) and torch.equal(
                        torch.where(finite, 0, a).nan_to_num(nan=0.5), torch.where(finite, 0, b).nan_to_num(nan=0.5))
                    if not same:
                        raise self._error(step, before, f"an exact pass changed which values of {path} are "
                                          f"NaN or Inf")
                    a, b = a[finite], b[finite]
                err = relative_error(a, b)
                if not err <= self.tolerance:  # NaN fails too
                    raise self._error(step, before, f"an exact pass changed {path} by {err:.3g} "
                                      f"(norm-relative; tolerance {self.tolerance:g})")

    def _compare_metadata(self, step: Step, before: list[str], recorded: dict) -> None:
        """Every node that computes a tensor must have kept true ``tensor_meta`` through the pass."""
        for node, old in recorded.items():
            new = node.meta.get("tensor_meta")
            if new is None or node.op == "output":
                continue
            if old is None:
                raise self._error(step, before, f"node {node.name!r} ({node.op} {node.target}) has no "
                                  f"tensor_meta: a rewrite must copy the metadata of the node it replaces "
                                  f"and annotate the nodes it creates (fxcompress.capture.record_meta)")
            if _meta_shapes(old) != _meta_shapes(new):
                raise self._error(step, before, f"node {node.name!r} records {_meta_shapes(old)} but computes "
                                  f"{_meta_shapes(new)}: a rewrite left stale metadata")


def _meta_shapes(meta: Any) -> Any:
    """The (shape, dtype) pairs inside a (nested) tensor_meta; TensorMetadata is itself a NamedTuple."""
    if hasattr(meta, "shape") and hasattr(meta, "dtype"):
        return (tuple(meta.shape), meta.dtype)
    if isinstance(meta, (list, tuple)):
        return tuple(_meta_shapes(m) for m in meta)
    if isinstance(meta, dict):
        return {k: _meta_shapes(v) for k, v in meta.items()}
    return meta
