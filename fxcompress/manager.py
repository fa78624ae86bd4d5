"""PassManager: checks a pipeline before any work, then verifies after every pass.

Before any work (all :class:`ConfigError`): unknown pass names (with close
matches), unknown or ill-typed options (with the valid ones), unmet
``requires``, ``scope``/``skip`` patterns that match no module, an
``eval_only`` pass given a model in training mode.

After each pass, by ``check`` level:

``"none"``   ``graph.lint()`` and one recompile; shapes are re-propagated (later
             passes and the report need them) but nothing is compared.
``"shapes"`` also: the output structure, shapes and dtypes are unchanged.
``"full"``   also: no tensor node lost its ``tensor_meta`` and every recorded
             shape is still true; outputs of ``exact`` passes equal the previous
             outputs within ``tolerance`` (norm-relative); the stage invariants
             of :mod:`fxcompress.verify`.

Any failure raises :class:`PassError` naming the pass, the passes before it,
and the reason.  Tests always run with ``check="full"``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Sequence, Union

import torch
from torch import fx

from .capture import propagate_shapes
from .errors import ConfigError, FxCompressError, InputError, PassError
from .pass_base import Pass, PassContext, check_option_types, module_path_of
from .registry import close_matches, get_pass
from .report import PassRow, Report, snapshot
from .verify import verify

__all__ = ["PassManager", "Step", "PipelineEntry", "normalize_pipeline", "relative_error"]

PipelineEntry = Union[Pass, str, tuple]
Check = Literal["full", "shapes", "none"]
CHECKS = ("full", "shapes", "none")
HISTORY_KEY = "fxcompress_history"


@dataclass(frozen=True)
class Step:
    """One pipeline entry, resolved: the pass object and where it may act."""

    pass_: Pass
    scope: tuple[str, ...] = ()
    skip: tuple[str, ...] = ()

    def describe(self) -> dict[str, Any]:
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
        if isinstance(entry, Pass):
            if options:
                raise ConfigError(f"entry {i}: give options to the pass object itself, not beside it: {options}")
            pass_ = entry
        elif isinstance(entry, str) or (isinstance(entry, type) and issubclass(entry, Pass)):
            cls = get_pass(entry) if isinstance(entry, str) else entry
            check_option_types(cls, options)
            try:
                pass_ = cls(**options)
            except ConfigError:
                raise
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"pass {cls.name!r}: invalid options {options}: {exc}") from exc
        else:
            raise ConfigError(
                f"entry {i} is {entry!r}: a pipeline entry is a pass object, a pass name, "
                f"or (name, {{options}})"
            )
        steps.append(Step(pass_, scope, skip))
    return steps


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖a‖ in float64 (0 when both are zero)."""
    a64, b64 = a.detach().double(), b.detach().double()
    denom = a64.norm().item()
    diff = (a64 - b64).norm().item()
    return diff / denom if denom else diff


def _flatten(value: Any, path: str = "out") -> list[tuple[str, Any]]:
    """Leaves of a nested output with their paths; containers recorded by type."""
    if isinstance(value, torch.Tensor):
        return [(path, value)]
    if isinstance(value, dict):
        out = [(path, ("dict", tuple(value.keys())))]
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


class PassManager:
    """Runs an ordered list of passes with verification after each one."""

    def __init__(self, passes: Sequence[PipelineEntry], *, check: Check = "full",
                 tolerance: float = 1e-4, progress: bool = False) -> None:
        if check not in CHECKS:
            raise ConfigError(f"check must be one of {CHECKS}, got {check!r}")
        if not (isinstance(tolerance, (int, float)) and tolerance >= 0):
            raise ConfigError(f"tolerance must be a non-negative number, got {tolerance!r}")
        self.steps = normalize_pipeline(passes)
        self.check = check
        self.tolerance = float(tolerance)
        self.progress = progress

    # -- before any work ---------------------------------------------------
    def validate(self, gm: fx.GraphModule) -> None:
        """Everything that can be checked without running a pass."""
        done = list(getattr(gm, "meta", {}).get(HISTORY_KEY, []))
        paths = {name for name, _ in gm.named_modules()} | {module_path_of(n) for n in gm.graph.nodes}
        for i, step in enumerate(self.steps):
            p = step.pass_
            missing = [r for r in p.requires if r not in done]
            if missing:
                raise ConfigError(
                    f"pass {p.name!r} (entry {i}) requires {missing} to run earlier in the pipeline; "
                    f"add {missing} before it (passes so far: {done or 'none'})"
                )
            if p.eval_only and gm.training:
                raise ConfigError(
                    f"pass {p.name!r} is only valid in eval mode (it folds statistics that training "
                    f"would keep updating) but the model is in training mode; call model.eval() first"
                )
            for kind, pats in (("scope", step.scope), ("skip", step.skip)):
                for pat in pats:
                    if not any(PassContext(scope=(pat,)).in_scope(path) for path in paths):
                        raise ConfigError(
                            f"pass {p.name!r} (entry {i}): {kind} pattern {pat!r} matches no module"
                            f"{close_matches(pat, paths)}"
                        )
            done.append(p.name)

    # -- the run -------------------------------------------------------------
    def run(self, gm: fx.GraphModule, ctx: PassContext) -> tuple[fx.GraphModule, Report]:
        """Run every pass on ``gm`` (rewritten in place where passes do so)."""
        self.validate(gm)
        args, kwargs = ctx.example_inputs()
        outputs = propagate_shapes(gm, args, kwargs)
        reference_spec = _spec(_flatten(outputs))
        report = Report(before=snapshot(gm))
        history = getattr(gm, "meta", {}).setdefault(HISTORY_KEY, []) if hasattr(gm, "meta") else []
        steps: Iterable[Step] = self.steps
        if self.progress:
            from tqdm.auto import tqdm

            steps = tqdm(self.steps, desc="fxcompress", unit="pass", leave=False)
        for step in steps:
            before = [s.pass_.name for s in self.steps[: self.steps.index(step)]]
            ctx.scope, ctx.skip = step.scope, step.skip
            start = time.perf_counter()
            try:
                result = step.pass_(gm, ctx)
            except FxCompressError:
                raise
            except Exception as exc:
                raise self._error(step, before, f"raised {type(exc).__name__}: {exc}") from exc
            finally:
                ctx.scope, ctx.skip = (), ()
            seconds = time.perf_counter() - start
            gm = result.gm
            outputs = self._check(step, before, gm, ctx, outputs, reference_spec)
            new_history = list(history) + [step.pass_.name]
            if hasattr(gm, "meta"):
                gm.meta[HISTORY_KEY] = new_history
            history = new_history
            report.rows.append(PassRow(step.pass_.name, step.pass_.options(), snapshot(gm),
                                       seconds, bool(result.modified), dict(result.stats)))
            report.notes.extend(f"{step.pass_.name}: {n}" for n in result.stats.get("notes", []))
        return gm, report

    def _error(self, step: Step, before: list[str], reason: str) -> PassError:
        after = f"after {', '.join(before)}" if before else "as the first pass"
        return PassError(f"pass {step.pass_.name!r} ({after}) failed: {reason}")

    def _check(self, step: Step, before: list[str], gm: fx.GraphModule, ctx: PassContext,
               previous: Any, reference_spec: list) -> Any:
        if not isinstance(gm, fx.GraphModule):
            raise self._error(step, before, f"returned {type(gm).__name__}, not a GraphModule")
        try:
            gm.graph.lint()
        except Exception as exc:
            raise self._error(step, before, f"the graph does not lint: {exc}") from exc
        gm.recompile()
        args, kwargs = ctx.example_inputs()
        recorded = {n: n.meta.get("tensor_meta") for n in gm.graph.nodes}
        try:
            outputs = propagate_shapes(gm, args, kwargs)
        except InputError as exc:
            raise self._error(step, before, f"the rewritten graph no longer runs: {exc}") from exc
        if self.check == "full":
            self._compare_metadata(step, before, recorded)
        if self.check == "none":
            return outputs
        new, old = _flatten(outputs), _flatten(previous)
        if _spec(new) != reference_spec:
            diff = [f"{p}: {a} -> {b}" for (p, a), (_, b) in zip(reference_spec, _spec(new)) if a != b]
            raise self._error(step, before, "the output structure, shapes or dtypes changed: "
                              + ("; ".join(diff[:5]) or f"{len(reference_spec)} -> {len(new)} leaves"))
        if self.check == "full":
            if step.pass_.exact:
                for (path, a), (_, b) in zip(old, new):
                    if isinstance(a, torch.Tensor) and a.is_floating_point():
                        err = relative_error(a, b)
                        if not err <= self.tolerance:
                            raise self._error(step, before, f"an exact pass changed {path} by "
                                              f"{err:.3g} (norm-relative; tolerance {self.tolerance:g})")
            stage, problems = verify(gm)
            if problems:
                raise self._error(step, before, f"{stage}-stage invariants broken: " + "; ".join(problems[:5]))
        return outputs

    def _compare_metadata(self, step: Step, before: list[str], recorded: dict) -> None:
        """Every tensor node must have kept true ``tensor_meta`` through the pass."""
        for node, old in recorded.items():
            new = node.meta.get("tensor_meta")
            if new is None or node.op == "output":
                continue
            if old is None:
                raise self._error(step, before, f"node {node.name!r} ({node.op} {node.target}) lost its "
                                  f"tensor_meta: a rewrite must copy the metadata of the node it replaces")
            if _meta_shapes(old) != _meta_shapes(new):
                raise self._error(step, before, f"node {node.name!r} records shape {_meta_shapes(old)} "
                                  f"but computes {_meta_shapes(new)}: a rewrite left stale metadata")


def _meta_shapes(meta: Any) -> Any:
    """The shapes inside a (nested) tensor_meta; TensorMetadata is itself a NamedTuple."""
    if hasattr(meta, "shape") and hasattr(meta, "dtype"):
        return (tuple(meta.shape), meta.dtype)
    if isinstance(meta, (list, tuple)):
        return tuple(_meta_shapes(m) for m in meta)
    if isinstance(meta, dict):
        return {k: _meta_shapes(v) for k, v in meta.items()}
    return meta
