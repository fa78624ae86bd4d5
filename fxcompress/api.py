"""``fxcompress.run``: capture a copy of the model, run a pipeline, return the result.

The caller's model is never mutated: ``run`` works on a deep copy (the only
copy it makes; for a ``GraphModule`` the node metadata containers are copied
too), so the caller's parameters, buffers, structure, node metadata and
training flags are exactly as before, whatever the passes do.  The example
inputs are copied once too, so a model that writes into its input leaves the
caller's tensors as they were.  Everything that can be checked is checked
before any work (:mod:`fxcompress.boundary`, :meth:`PassManager.check_context`,
:meth:`PassManager.validate`).
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import fx, nn

from . import boundary
from .capture import FRONTEND_KEY, gc_paused, normalize_inputs, trace
from .errors import ConfigError
from .manager import CHECK_ENV, Check, PassManager, PipelineEntry
from .pass_base import PassContext
from .report import Report

__all__ = ["run", "Result", "state_hash", "CHECK_ENV"]  # CHECK_ENV: the manager's, named here too


def state_hash(module: nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a module's state dict."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself: no copy
    return h.hexdigest()


@dataclass
class Result:
    """What :func:`run` returns: the compressed ``GraphModule`` and the report.

    ``pipeline`` lists the passes as run (name, options, scope, skip);
    ``source_state_hash`` identifies the model it was made from (artifacts
    record both).
    """

    model: fx.GraphModule
    report: Report
    pipeline: list[dict[str, Any]] = field(default_factory=list)
    source_state_hash: str = ""

    def save(self, path: str, **kwargs: Any) -> str:
        """Save as an artifact (signed when given a key); returns its id.

        See :func:`fxcompress.artifact.save` for the keyword arguments.  Under
        ``torchrun`` only rank 0 writes the file; every rank returns its id, and a
        failure on rank 0 raises :class:`~fxcompress.errors.DistributedError` on all.
        """
        from .artifact import save  # imported on use: keeps `import fxcompress` light
        from .distributed import on_rank_zero

        return on_rank_zero(lambda: save(self, path, **kwargs), f"saving the artifact {path}")

    def __str__(self) -> str:
        return str(self.report)


def run(
    model: nn.Module,
    passes: Sequence[PipelineEntry],
    example_inputs: Any,
    *,
    calibration_data: Iterable | None = None,
    eval_fn: Callable[[nn.Module], float] | None = None,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    teacher: nn.Module | None = None,
    check: Check | None = None,
    progress: bool = True,
    tolerance: float = 1e-3,
    backend: str = "x86",
    seed: int = 0,
    frontend: str = "auto",
    leaf_modules: Iterable[type | str] = (),
    concrete_args: dict[str, Any] | None = None,
    autowrap: Iterable[Callable] = (),
) -> Result:
    """Compress ``model`` with ``passes`` and return a :class:`Result`.

    ``model`` is an ``nn.Module`` (captured with :func:`fxcompress.trace`,
    using ``frontend`` and ``leaf_modules``/``concrete_args``/``autowrap``) or a
    ``GraphModule``.  When ``torch.export`` captured it (or ``"auto"`` had a reason to
    note), the report's first note says so, and why.
    ``example_inputs`` is a tensor, a tuple of positional inputs or a dict of
    keyword inputs.  Pipeline entries are pass objects, pass names or classes,
    or ``(name, {options, "scope": [...], "skip": [...]})``.

    The pipeline is validated before any work (ConfigError).  ``check`` is
    ``"full"``, ``"shapes"`` or ``"none"`` (see :class:`PassManager`); when it
    is None, the environment variable ``FXCOMPRESS_CHECK`` decides, and
    ``"shapes"`` when that is unset (the test suite sets it to ``"full"``).
    ``tolerance`` bounds the norm-relative output change of ``exact`` passes.  The
    default, 1e-3, sits above the float32 round-off of deep nets (fusing BatchNorm
    into a realistic-weights resnet152 moves its output by 2.9e-4, see
    ``benchmarks/zoo.py``) and far below what a wrong rewrite does.
    ``eval_fn(model) -> float`` (a task metric, e.g. top-1) is measured before
    and after when given and shown in the report.  ``teacher`` is the model that
    ``finetune(distill=...)`` distils from (typically the uncompressed model; it is
    only read).  An empty pipeline returns
    an equivalent model.  The caller's model is never mutated.  Capture,
    copying and verification run with Python's cyclic garbage collector
    paused (restored afterwards; passes run with it as the caller had it).
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"run() takes an nn.Module or GraphModule, got {type(model).__name__}")
    boundary.check_run_arguments(backend=backend, seed=seed, progress=progress, eval_fn=eval_fn, loss_fn=loss_fn)
    manager = PassManager(passes, check=check, tolerance=tolerance, progress=progress)
    args, kwargs = normalize_inputs(example_inputs)
    boundary.check_example_inputs(args, kwargs)
    boundary.check_weights(model)
    # The one copy of the inputs: nothing below can write into the caller's tensors.
    args, kwargs = boundary.clone_inputs(args), boundary.clone_inputs(kwargs)
    ctx = PassContext(example_args=args, example_kwargs=kwargs, calibration_data=calibration_data,
                      eval_fn=eval_fn, loss_fn=loss_fn, teacher=teacher, backend=backend, seed=seed,
                      progress=progress)
    manager.check_context(ctx, model)  # before copying and tracing: a pipeline that cannot run costs nothing
    source_hash = state_hash(model)
    gm = trace(_private_copy(model), kwargs or args, frontend=frontend, leaf_modules=leaf_modules,
               concrete_args=concrete_args, autowrap=autowrap)
    captured = gm.meta.get(FRONTEND_KEY)
    manager.validate(gm)  # before eval_fn, for the same reason
    metric_before = boundary.check_metric(eval_fn(gm), "before the pipeline") if eval_fn is not None else None
    gm, report = manager.run(gm, ctx)
    if captured and (captured["frontend"] != "fx" or captured.get("why")):  # plain fx capture: nothing to say
        why = f" ({captured['why']})" if captured.get("why") else ""
        report.notes.insert(0, f"captured with the {captured['frontend']} front end{why}")
    if eval_fn is not None:
        after = boundary.check_metric(eval_fn(gm), "after the pipeline")
        report.metrics["task metric"] = {"before": metric_before, "after": after,
                                         "change": f"{after - metric_before:+.4g}"}
    return Result(gm, report, [s.describe() for s in manager.steps], source_hash)


def _private_copy(model: nn.Module) -> nn.Module:
    """A deep copy that shares nothing mutable with ``model``.

    ``GraphModule`` deep copies share each node's nested metadata containers
    (torch copies ``node.meta`` shallowly); passes annotate nodes in place, so
    those containers are copied as well.
    """
    with torch.no_grad(), gc_paused():
        working = copy.deepcopy(model)
    if isinstance(working, fx.GraphModule):
        for node in working.graph.nodes:
            node.meta = {k: copy.deepcopy(v) if isinstance(v, (dict, list, set)) else v
                         for k, v in node.meta.items()}
    return working
