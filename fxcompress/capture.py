"""Capture: model -> ``GraphModule`` with shape/dtype metadata on every tensor node.

Two front ends, one dialect: ``torch.fx`` symbolic tracing (here) and
``torch.export`` (:mod:`fxcompress.capture_export`), both producing the
module-level graphs that :mod:`fxcompress.ops` describes; ``frontend="auto"``
picks the first that captures the model whole.

Guarantees of :func:`trace`:

* the returned ``GraphModule`` computes what the model computes on the
  example inputs (checked by running it once during shape propagation);
* every node whose value is a tensor (or a container of tensors) carries
  ``node.meta["tensor_meta"]`` (torch's own key, nested like the value), and
  every node carries ``node.meta["type"]``;
* the module is in the same train/eval mode as the model (the root flag is
  copied; submodules keep their own flags);
* its submodules and parameters are *shared* with the model (like
  ``symbolic_trace``), but tracing and shape propagation never change the
  model's state: buffers (BatchNorm running statistics, observer ranges) and
  the global RNG are restored after tracing and after the example run.  A
  forward that writes into a buffer (a call counter) is traced again with
  buffers as graph values, so the graph records the write instead of
  dropping it.  :func:`fxcompress.run` copies the model before it rewrites
  anything;
* the example inputs are never written into: shape propagation runs on
  copies of them, so a model that normalises its input in place sees the
  same values on every propagation.
"""

from __future__ import annotations

import contextlib
import fnmatch
import gc
import inspect
import math
import os
import traceback
import types
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import fx, nn

from .capture_export import FRONTEND_KEY, FRONTENDS, containers_kept_whole, export_capture
from .errors import ConfigError, InputError, TraceError
from .pass_base import close_matches
from .shapes import buffers_restored, propagate_shapes, record_meta, tensor_metadata
from .verify import role_of

__all__ = ["trace", "FRONTENDS", "FRONTEND_KEY", "normalize_inputs", "propagate_shapes", "record_meta",
           "tensor_metadata", "gc_paused"]


def normalize_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """A tensor, a tuple/list of positional inputs, or a dict of keyword inputs -> (args, kwargs)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        bad = [k for k in example_inputs if not isinstance(k, str)]
        if bad:
            raise InputError(f"keyword example inputs need str keys (argument names), got {bad}")
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise InputError(
        f"example_inputs must be a tensor, a tuple of positional inputs or a dict of keyword "
        f"inputs, got {type(example_inputs).__name__}; wrap a single input as (x,)"
    )


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for the block (reference counting goes on).

    A graph is a web of long-lived objects (nodes, modules, metadata), and
    each full collection walks all of them: with the collector running,
    capturing and checking a 16k-node graph took measurably more time per
    node than a 1k-node one.  Used around graph-wide work only (capture,
    copying, verification), never around a pass, whose loops (calibration,
    fine-tuning) may create cyclic garbage.  Restores the caller's setting.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class _PathTracer(fx.Tracer):
    """A tracer that knows which module it is in, so errors can name it.

    ``proxy_buffers`` makes buffer reads graph values (``get_attr`` nodes), so
    that in-place writes into them are recorded rather than run at trace time.
    """

    def __init__(self, leaf_modules: Iterable[type | str], autowrap: Iterable[Callable | types.ModuleType],
                 proxy_buffers: bool = False) -> None:
        wrap = tuple(autowrap)
        bad = [w for w in wrap if not (callable(w) or isinstance(w, types.ModuleType))]
        if bad:
            raise ConfigError(f"autowrap takes functions or Python modules, got {bad}")
        fns = tuple(w for w in wrap if not isinstance(w, types.ModuleType))
        mods = tuple(w for w in wrap if isinstance(w, types.ModuleType))
        super().__init__(autowrap_modules=(math, *mods), autowrap_functions=fns)
        self.proxy_buffer_attributes = proxy_buffers
        leaves = tuple(leaf_modules)
        bad = [x for x in leaves if not (isinstance(x, str) or (isinstance(x, type) and issubclass(x, nn.Module)))]
        if bad:
            raise ConfigError(f"leaf_modules takes nn.Module types or module-path patterns, got {bad}")
        self._leaf_types = tuple(x for x in leaves if isinstance(x, type))
        self._leaf_paths = tuple(x for x in leaves if isinstance(x, str))
        self._path_stack: list[str] = []
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        if any(fnmatch.fnmatchcase(qualname, p) for p in self._leaf_paths):
            return True
        # fxcompress's own runtime modules (observers, lowered kernels, pruned
        # attention) are ops of the dialect: re-capturing a compressed model
        # must keep them whole, never trace into their implementation.
        if role_of(m) or getattr(type(m), "fxc_leaf", False):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        self._path_stack.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            # The innermost module unwinds first: remember it, not its parents.
            if self.failed_in is None:
                self.failed_in = self._path_stack[-1]
            raise
        finally:
            self._path_stack.pop()


_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_OWN_DIR = os.path.dirname(__file__) + os.sep


def _user_frame(tb: types.TracebackType | None) -> str:
    """The innermost traceback frame outside torch and fxcompress: where the model's code failed."""
    frames = traceback.extract_tb(tb)
    for frame in reversed(frames):
        if not frame.filename.startswith((_TORCH_DIR, _OWN_DIR)):
            return f"{frame.filename}:{frame.lineno}: {(frame.line or '').strip()}"
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "<unknown location>"


def _trace_error(model: nn.Module, tracer: _PathTracer, exc: Exception) -> TraceError:
    where = tracer.failed_in
    location = _user_frame(exc.__traceback__)
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if where:
        place = f"in module {where!r} ({type(model.get_submodule(where)).__name__})"
        leaf_hint = f"keep that module whole with leaf_modules=[{where!r}] (or its type), "
    else:
        place = "in its top-level forward"
        leaf_hint = ""
    return TraceError(
        f"cannot trace {type(model).__name__} {place} at {location} ({type(exc).__name__}: {reason}). "
        f"Remedies: {leaf_hint}fix the argument that drives the control flow with "
        f"concrete_args={{name: value}}, or record the offending function as one node with "
        f"autowrap=(fn,)"
    )


def trace(
    model: nn.Module,
    example_inputs: Any,
    *,
    frontend: str = "auto",
    leaf_modules: Iterable[type | str] = (),
    concrete_args: dict[str, Any] | None = None,
    autowrap: Iterable[Callable | types.ModuleType] = (),
) -> fx.GraphModule:
    """Capture ``model`` into a shape-annotated ``GraphModule``.

    ``example_inputs`` is a tensor, a tuple of positional inputs or a dict of
    keyword inputs.  ``leaf_modules`` are module types or fnmatch path patterns
    ("encoder.*") kept whole (their ``forward`` is recorded as one node);
    ``concrete_args`` fixes arguments by name (e.g. a flag that drives control
    flow; the graph asserts the value and takes it as the default).  Arguments
    of ``forward`` that the example inputs leave out are fixed to their
    defaults the same way, so ``if mask is None`` takes the branch the example
    inputs take.  ``autowrap`` lists functions (or Python modules) whose calls
    are recorded as single nodes instead of being traced into.

    Functional convs, transposed convs and linears on the model's parameters
    (``F.conv2d(x, self.weight, ...)``) are raised to ``call_module`` nodes of the torch
    classes holding the same parameters (:mod:`fxcompress.raising`), so every pass sees
    layers as modules.  A ``GraphModule`` is already captured: it is annotated in place
    and returned (capture options are then an error, not silently ignored).

    ``frontend`` chooses how: ``"fx"`` is symbolic tracing (the options above are its own);
    ``"export"`` is ``torch.export`` (non-strict), raised to the same module-level dialect
    (:mod:`fxcompress.capture_export`: dynamic batch and sequence dimensions, keyword inputs
    and the output structure kept); ``"auto"`` (the default) tries symbolic tracing and takes
    ``torch.export`` when tracing fails or keeps a ``torch.nn`` container with layers inside
    whole (``nn.TransformerEncoder``), unless fx options are given.  ``gm.meta[FRONTEND_KEY]``
    says which front end captured the graph and why.

    Raises :class:`TraceError` naming the module path and source line where
    tracing failed and the remedy to try (for ``"auto"``: why each front end
    failed), :class:`InputError` when the example inputs do not fit the model,
    :class:`ConfigError` for malformed options.
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"trace() takes an nn.Module, got {type(model).__name__}")
    if frontend not in FRONTENDS:
        raise ConfigError(f"frontend must be one of {list(FRONTENDS)}, got {frontend!r}")
    args, kwargs = normalize_inputs(example_inputs)
    fx_options = bool(tuple(leaf_modules) or concrete_args or tuple(autowrap))
    if frontend == "export" and fx_options:
        raise ConfigError("leaf_modules, concrete_args and autowrap are symbolic tracing's options; "
                          "frontend='export' takes none of them (use frontend='fx' or 'auto')")
    with gc_paused():
        if isinstance(model, fx.GraphModule) or frontend == "fx" or (frontend == "auto" and fx_options):
            gm = _capture(model, args, kwargs, leaf_modules, concrete_args, autowrap)
            return _mark(gm, "fx", None) if not isinstance(model, fx.GraphModule) else gm
        if frontend == "export":
            return _mark(_exported(model, args, kwargs), "export", None)
        return _auto(model, args, kwargs)


def _exported(model: nn.Module, args: tuple, kwargs: dict) -> fx.GraphModule:
    with buffers_restored(model):
        gm = export_capture(model, args, kwargs)
    propagate_shapes(gm, args, kwargs)
    return gm


def _mark(gm: fx.GraphModule, frontend: str, why: str | None) -> fx.GraphModule:
    gm.meta[FRONTEND_KEY] = {"frontend": frontend, "why": why}
    return gm


def _auto(model: nn.Module, args: tuple, kwargs: dict) -> fx.GraphModule:
    """Symbolic tracing, else ``torch.export``: see :func:`trace`'s ``frontend``."""
    try:
        gm = _capture(model, args, kwargs, (), None, ())
    except TraceError as fx_error:
        try:
            exported = _exported(model, args, kwargs)
        except TraceError as export_error:
            raise TraceError(f"cannot capture {type(model).__name__} with either front end. "
                             f"Symbolic tracing: {fx_error} -- torch.export: {export_error}") from export_error
        return _mark(exported, "export", f"symbolic tracing failed: {str(fx_error).split('. Remedies')[0]}")
    whole = containers_kept_whole(gm)
    if not whole:
        return _mark(gm, "fx", None)
    kept = ", ".join(f"{p!r} ({type(gm.get_submodule(p)).__name__})" for p in whole)
    try:
        exported = _exported(model, args, kwargs)
    except TraceError as export_error:
        return _mark(gm, "fx", f"symbolic tracing keeps {kept} whole; torch.export failed too: {export_error}")
    return _mark(exported, "export", f"symbolic tracing keeps {kept} whole (their layers would be out of reach)")


def _capture(model: nn.Module, args: tuple, kwargs: dict, leaf_modules: Iterable[type | str],
             concrete_args: dict[str, Any] | None,
             autowrap: Iterable[Callable | types.ModuleType]) -> fx.GraphModule:
    """:func:`trace`'s work, once the inputs are normalised."""
    if isinstance(model, fx.GraphModule):
        if tuple(leaf_modules) or concrete_args or tuple(autowrap):
            raise ConfigError(
                "leaf_modules, concrete_args and autowrap apply to tracing, but the model is already a "
                "GraphModule; capture the original nn.Module with them instead"
            )
        gm = model
    else:
        _check_leaf_patterns(model, leaf_modules)
        concrete = None
        for proxy_buffers in (False, True):
            tracer = _PathTracer(leaf_modules, autowrap, proxy_buffers)
            with torch.random.fork_rng(devices=[]), buffers_restored(model) as changed:
                try:
                    concrete = _with_defaults(model, args, kwargs, concrete_args)
                    graph = tracer.trace(model, concrete_args=concrete)
                except Exception as exc:  # any failure inside user code while tracing
                    raise _trace_error(model, tracer, exc) from exc
            # A buffer written at trace time (a call counter) is a write the graph would drop:
            # trace again with buffers as graph values, which records an in-place write.
            if not changed():
                break
        replaced = [name for name, how in changed().items() if how == "replaced"]
        if replaced:  # attribute assignment is not a graph operation: the graph would drop it
            raise TraceError(
                f"cannot trace {type(model).__name__}: its forward assigns buffer {replaced[0]!r} "
                f"(self.{replaced[0].rpartition('.')[2]} = ...), which a traced graph cannot record. "
                f"Remedies: update it in place (e.g. .add_() or .copy_()), or keep the module that assigns it "
                f"whole with leaf_modules=[...]"
            )
        _name_concrete_placeholders(model, graph, concrete or {})
        gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
        _copy_training_flags(model, gm)
        from .raising import raise_functional_layers  # on use: it needs ops, which import fxcompress defers

        raise_functional_layers(gm)  # F.conv2d / F.linear on parameters -> nn modules: one dialect
    propagate_shapes(gm, args, kwargs)
    return gm


def _check_leaf_patterns(model: nn.Module, leaf_modules: Iterable[type | str]) -> None:
    """ConfigError for a ``leaf_modules`` path pattern that matches no module (a typo, as for scope)."""
    patterns = [p for p in leaf_modules if isinstance(p, str)]
    if not patterns:
        return
    paths = [name for name, _ in model.named_modules() if name]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(path, pattern) for path in paths):
            raise ConfigError(f"leaf_modules pattern {pattern!r} matches no module of {type(model).__name__}"
                              f"{close_matches(pattern, paths)}")


def _with_defaults(model: nn.Module, args: tuple, kwargs: dict,
                   concrete_args: dict[str, Any] | None) -> dict[str, Any] | None:
    """``concrete_args`` plus the defaults of the forward arguments no example input gives."""
    concrete = dict(concrete_args or {})
    params = list(inspect.signature(model.forward).parameters.values())
    for p in params[len(args):]:
        if (p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is not p.empty
                and p.name not in kwargs and p.name not in concrete):
            concrete[p.name] = p.default
    return concrete or None


def _name_concrete_placeholders(model: nn.Module, graph: fx.Graph, concrete: dict[str, Any]) -> None:
    """Give fixed arguments their own name back and their fixed value as default.

    torch.fx renames them ("flag" -> "flag_1") and makes them required; then
    ``gm(x)`` and ``gm(x, flag=...)`` would both fail where ``model(x)`` works.
    """
    params = list(inspect.signature(model.forward).parameters.values())
    placeholders = graph.find_nodes(op="placeholder")
    if len(params) != len(placeholders):  # *args/**kwargs: leave fx's names alone
        return
    for param, node in zip(params, placeholders):
        if param.name in concrete:
            node.target = param.name
            node.args = node.args or (concrete[param.name],)


def _copy_training_flags(model: nn.Module, gm: fx.GraphModule) -> None:
    """Give the root and the containers GraphModule creates the model's train/eval flags.

    Called submodules are the model's own objects and already have theirs;
    the containers on their paths ("layer1", "layer1.0") are fresh
    ``nn.Module()`` objects in training mode, and ``gm.train(flag)`` would
    overwrite the flags of the shared modules too (and so the model's).
    """
    gm.training = model.training
    for name, module in gm.named_modules():
        if not name:
            continue
        try:
            original = model.get_submodule(name)
        except AttributeError:
            continue
        if original is not module:
            module.training = original.training
