"""``fxcompress.run``: capture a copy of the model, run a pipeline, return the result.

The caller's model is never mutated: ``run`` works on a deep copy (the only
copy it makes), so the caller's parameters, buffers, structure and training
flag are exactly as before, whatever the passes do.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import fx, nn

from .capture import normalize_inputs, trace
from .errors import ConfigError
from .manager import Check, PassManager, PipelineEntry
from .pass_base import PassContext
from .report import Report

__all__ = ["run", "Result", "state_hash"]


def state_hash(module: nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a module's state dict."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
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

    def save(self, path: str, **kwargs: Any) -> None:
        """Save as a signed-if-keyed artifact; see :func:`fxcompress.save`."""
        from .artifact import save

        save(self, path, **kwargs)

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
    check: Check = "shapes",
    progress: bool = True,
    tolerance: float = 1e-4,
    backend: str = "x86",
    seed: int = 0,
    leaf_modules: Iterable[type | str] = (),
    concrete_args: dict[str, Any] | None = None,
    autowrap: Iterable[Callable] = (),
) -> Result:
    """Compress ``model`` with ``passes`` and return a :class:`Result`.

    ``model`` is an ``nn.Module`` (captured with :func:`fxcompress.trace`,
    using ``leaf_modules``/``concrete_args``/``autowrap``) or a ``GraphModule``.
    The pipeline is validated before any work; see :class:`PassManager` for
    ``check`` and ``tolerance``.  An empty pipeline returns an equivalent model.
    ``eval_fn(model) -> float`` (a task metric, e.g. top-1) is measured before
    and after when given and shown in the report.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"run() takes an nn.Module or GraphModule, got {type(model).__name__}")
    manager = PassManager(passes, check=check, tolerance=tolerance, progress=progress)
    args, kwargs = normalize_inputs(example_inputs)
    source_hash = state_hash(model)
    with torch.no_grad():
        working = copy.deepcopy(model)
    gm = trace(working, example_inputs, leaf_modules=leaf_modules, concrete_args=concrete_args,
               autowrap=autowrap)
    ctx = PassContext(example_args=args, example_kwargs=kwargs, calibration_data=calibration_data,
                      eval_fn=eval_fn, loss_fn=loss_fn, backend=backend, seed=seed, progress=progress)
    metric_before = eval_fn(gm) if eval_fn is not None else None
    gm, report = manager.run(gm, ctx)
    if eval_fn is not None:
        after = eval_fn(gm)
        report.metrics["task metric"] = {"before": metric_before, "after": after,
                                         "ratio": f"{after - metric_before:+.4g}"}
    return Result(gm, report, [s.describe() for s in manager.steps], source_hash)
