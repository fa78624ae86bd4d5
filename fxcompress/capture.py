"""Capture: model -> ``GraphModule`` with shape/dtype metadata on every tensor node.

Today the front end is ``torch.fx`` symbolic tracing.  A second front end
(``torch.export``) can be added here alone: it must produce the same
module-level dialect that :mod:`fxcompress.ops` describes.

Guarantees of :func:`trace`:

* the returned ``GraphModule`` computes what the model computes on the
  example inputs (checked by running it once during shape propagation);
* every node whose value is a tensor carries ``node.meta["tensor_meta"]``
  (torch's own key), and every node carries ``node.meta["type"]``;
* the module is in the same train/eval mode as the model; its submodules and
  parameters are *shared* with the model (like ``symbolic_trace``) —
  :func:`fxcompress.run` copies before it rewrites anything.
"""

from __future__ import annotations

import fnmatch
import math
import sys
import traceback
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from .errors import InputError, TraceError

__all__ = ["trace", "normalize_inputs", "propagate_shapes"]


def normalize_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """A tensor, a tuple/list of positional inputs, or a dict of keyword inputs -> (args, kwargs)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise InputError(
        f"example_inputs must be a tensor, a tuple of positional inputs or a dict of keyword "
        f"inputs, got {type(example_inputs).__name__}; wrap a single input as (x,)"
    )


class _PathTracer(fx.Tracer):
    """A tracer that knows which module it is in, so errors can name it."""

    def __init__(self, leaf_modules: Iterable[type | str], autowrap: Iterable[Callable]) -> None:
        fns = tuple(f for f in autowrap if callable(f) and not isinstance(f, type(math)))
        mods = tuple(m for m in autowrap if isinstance(m, type(math)))
        super().__init__(autowrap_modules=(math, *mods), autowrap_functions=fns)
        leaves = tuple(leaf_modules)
        self._leaf_types = tuple(x for x in leaves if isinstance(x, type))
        self._leaf_paths = tuple(x for x in leaves if isinstance(x, str))
        self.path_stack: list[str] = []
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        if any(fnmatch.fnmatchcase(qualname, p) for p in self._leaf_paths):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        self.path_stack.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.path_stack[-1]
            raise
        finally:
            self.path_stack.pop()


def _user_frame(tb: Any) -> str:
    """The innermost traceback frame outside torch: where the model's code failed."""
    frames = traceback.extract_tb(tb)
    torch_dir = torch.__file__.rpartition("/")[0]
    mine = __file__.rpartition("/")[0]
    for frame in reversed(frames):
        if not frame.filename.startswith((torch_dir, mine)):
            return f"{frame.filename}:{frame.lineno}: {frame.line}"
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "<unknown>"


def trace(
    model: nn.Module,
    example_inputs: Any,
    *,
    leaf_modules: Iterable[type | str] = (),
    concrete_args: dict[str, Any] | None = None,
    autowrap: Iterable[Callable] = (),
) -> fx.GraphModule:
    """Capture ``model`` into a shape-annotated ``GraphModule``.

    ``leaf_modules`` are module types or path patterns kept whole (their
    ``forward`` is not traced into); ``concrete_args`` fixes arguments (e.g. a
    flag that drives control flow); ``autowrap`` lists functions (or Python
    modules) whose calls are recorded as single nodes instead of being traced.
    Raises :class:`TraceError` naming the module path and source line where
    tracing failed, and :class:`InputError` when the example inputs do not fit.
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"trace() takes an nn.Module, got {type(model).__name__}")
    args, kwargs = normalize_inputs(example_inputs)
    if isinstance(model, fx.GraphModule):
        gm = model
    else:
        tracer = _PathTracer(leaf_modules, autowrap)
        try:
            graph = tracer.trace(model, concrete_args=concrete_args)
        except Exception as exc:  # any failure inside user code while tracing
            where = tracer.failed_in
            where_txt = f"in module {where!r} ({type(model.get_submodule(where)).__name__})" if where else "in the top-level forward"
            raise TraceError(
                f"cannot trace {type(model).__name__} {where_txt} at "
                f"{_user_frame(sys.exc_info()[2])}: {type(exc).__name__}: {exc}. "
                f"Remedies: keep that module whole with leaf_modules=[{where or type(model).__name__!r}], "
                f"fix a control-flow argument with concrete_args={{...}}, or wrap the offending "
                f"function with autowrap=(fn,)"
            ) from exc
        gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
        gm.train(model.training)
    propagate_shapes(gm, args, kwargs)
    return gm


def propagate_shapes(gm: fx.GraphModule, args: tuple, kwargs: dict | None = None) -> Any:
    """Run ``gm`` once on the inputs and record ``tensor_meta``/``type`` on every node.

    Returns the output.  Raises :class:`InputError` when the inputs do not fit
    the model, naming the node that failed.  Runs under ``no_grad``.
    """
    kwargs = kwargs or {}
    env_args = _bind_placeholders(gm, args, kwargs)
    interp = _MetaRecorder(gm)
    with torch.no_grad():
        try:
            return interp.run(*env_args)
        except InputError:
            raise
        except Exception as exc:
            node = interp.current
            shapes = [tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__ for a in env_args]
            raise InputError(
                f"the example inputs do not fit the model: node {node.name!r} "
                f"({node.op} {node.target}) failed with {type(exc).__name__}: {str(exc).splitlines()[0]}. "
                f"Inputs given: {shapes}; check their shape, dtype and number"
            ) from exc


def _bind_placeholders(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list[Any]:
    """Map positional + keyword inputs onto the graph's placeholders, in order."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values: list[Any] = list(args)
    if len(values) > len(placeholders):
        raise InputError(f"the model takes {len(placeholders)} inputs, got {len(values)} positional inputs")
    for node in placeholders[len(values):]:
        name = str(node.target).lstrip("*")
        if name in kwargs:
            values.append(kwargs[name])
        elif node.args:  # a default value recorded by the tracer
            values.append(node.args[0])
        else:
            raise InputError(f"missing example input {name!r} (inputs: {[str(p.target) for p in placeholders]})")
    unknown = set(kwargs) - {str(p.target).lstrip("*") for p in placeholders}
    if unknown:
        raise InputError(f"unknown keyword inputs {sorted(unknown)}; the model takes {[str(p.target) for p in placeholders]}")
    return values


class _MetaRecorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.current: fx.Node | None = None

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        result = super().run_node(n)
        record_meta(n, result)
        return result


def record_meta(node: fx.Node, value: Any) -> None:
    """Store torch's ``tensor_meta`` (nested like the value) and ``type`` on a node."""
    found = False

    def extract(obj: Any) -> Any:
        nonlocal found
        if isinstance(obj, torch.Tensor):
            found = True
            return _extract_tensor_metadata(obj)
        return obj

    meta = fx.node.map_aggregate(value, extract)
    if found:
        node.meta["tensor_meta"] = meta
    else:
        node.meta.pop("tensor_meta", None)
    node.meta["type"] = type(value)
