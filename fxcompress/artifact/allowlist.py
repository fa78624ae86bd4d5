"""Which functions and methods an artifact's graph may call, by name.

A saved graph names its ``call_function`` targets (``"torch.cat"``,
``"operator.add"``, ``"torch.ops.aten.add.Tensor"``) and its ``call_method``
names (``"view"``); loading maps names back to objects *only* through this
allow-list, never through a general import.  What is allowed:

* torch's tensor functions: those ``torch.overrides.get_overridable_functions``
  lists in ``torch``, ``torch.nn.functional``, ``torch.linalg``, ``torch.fft``
  and ``torch.special`` (this leaves out ``torch.load``, ``torch.save``,
  ``torch.from_file`` and every other function that is not a tensor op), and
  ``torch._assert`` (and the ``None`` check symbolic tracing inserts for an
  argument fixed to ``None``);
* torch's pure tensor-creation functions, which take no tensor and so are not
  "overridable": ``arange``, ``zeros``, ``ones``, ``full``, ``empty``, ``eye``,
  ``linspace``, ``logspace``, ``scalar_tensor``, ``tensor``, ``tril_indices``,
  ``triu_indices`` (random ones are left out: they read and advance global RNG
  state);
* operators in the ``torch.ops.aten`` and ``torch.ops.onednn`` namespaces,
  except file I/O ops (``quantized_decomposed`` is left out: it lives in the
  deprecated torch.ao quantization package and fxcompress never emits it);
* arithmetic, comparison and indexing functions of :mod:`operator`, the
  functions of :mod:`math`, and ``getattr`` (graph_codec additionally requires
  a constant, public attribute name);
* a fixed list of functions torchvision wraps for tracing;
* functions registered with :func:`register_function` (fxcompress's kernels do
  this at import; names under ``fxcompress.`` are imported on demand).

``call_method`` names: public methods of ``torch.Tensor`` minus those that act
outside the tensor's values (hooks, shared memory, storage swaps, autograd).
"""

from __future__ import annotations

import builtins
import importlib
import math
import operator
import re
from typing import Any, Callable

import torch

from fxcompress.errors import ArtifactError

__all__ = ["register_function", "function_name", "resolve_function", "check_method", "import_fxcompress_module"]

_OPERATOR_NAMES = (
    "add sub mul truediv floordiv mod pow matmul neg pos abs invert and_ or_ xor lshift rshift "
    "eq ne lt le gt ge not_ truth is_ is_not contains getitem setitem index "
    "iadd isub imul itruediv ifloordiv imod ipow imatmul iand ior ixor ilshift irshift"
).split()
_TORCH_NAMESPACES = ("torch", "torch.nn.functional", "torch.linalg", "torch.fft", "torch.special")
_OP_NAMESPACES = ("aten", "onednn")
_DENIED_OPS = frozenset({"from_file", "save", "_print"})
# Creation functions: their arguments are sizes, values and dtype/device options, never a file or a callable.
_CREATION = ("arange", "empty", "eye", "full", "linspace", "logspace", "ones", "scalar_tensor", "tensor",
             "tril_indices", "triu_indices", "zeros")
# Tensor methods whose effect reaches beyond the tensor's values.
_DENIED_METHODS = frozenset({
    "apply_", "map_", "map2_", "backward", "register_hook", "register_post_accumulate_grad_hook",
    "retain_grad", "module_load", "share_memory_", "pin_memory", "record_stream", "set_",
    "storage", "untyped_storage",
})
# Functions torchvision marks with torch.fx.wrap, so symbolic tracing keeps them as calls.
_TORCHVISION = frozenset({
    "torchvision.ops.stochastic_depth.stochastic_depth",
    "torchvision.models.swin_transformer.shifted_window_attention",
    "torchvision.models.swin_transformer._get_relative_position_bias",
    "torchvision.models.swin_transformer._patch_merging_pad",
    "torchvision.models.googlenet.GoogLeNetOutputs",
    "torchvision.models.inception.InceptionOutputs",
})
_OP_NAME = re.compile(r"torch\.ops\.([a-z_][a-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)(?:\.([A-Za-z_][A-Za-z0-9_]*))?")
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+")

_registered: dict[str, Callable[..., Any]] = {}
_by_name: dict[str, Any] = {}
_by_id: dict[int, str] = {}
_methods: frozenset[str] = frozenset()


def _index() -> None:
    """Build the name <-> object maps once (about 1000 entries, a few ms)."""
    global _methods
    if _by_name:
        return

    def add(name: str, obj: Any) -> None:
        if id(obj) not in _by_id:  # the first, most public name wins: torch.cat, not torch.functional.cat
            _by_id[id(obj)] = name
            _by_name[name] = obj

    add("builtins.getattr", builtins.getattr)
    for name in _OPERATOR_NAMES:
        add(f"operator.{name}", getattr(operator, name))
    for name in dir(math):
        if not name.startswith("_") and callable(getattr(math, name)):
            add(f"math.{name}", getattr(math, name))
    add("torch._assert", torch._assert)
    # What symbolic tracing inserts for an argument fixed to None (concrete_args, or a default
    # the example inputs leave out): a check, like torch._assert.
    add("torch.fx._symbolic_trace._assert_is_none", torch.fx._symbolic_trace._assert_is_none)
    for name in _CREATION:
        add(f"torch.{name}", getattr(torch, name))
    overridable = {f for fs in torch.overrides.get_overridable_functions().values() for f in fs}
    for ns_name in _TORCH_NAMESPACES:
        ns = importlib.import_module(ns_name)
        for name in dir(ns):
            obj = getattr(ns, name, None)
            if name.startswith("_") or not callable(obj):
                continue
            try:
                allowed = obj in overridable
            except TypeError:  # an unhashable callable cannot be a torch function
                continue
            if allowed:
                add(f"{ns_name}.{name}", obj)
    public = {n for n in dir(torch.Tensor) if not n.startswith("_") and callable(getattr(torch.Tensor, n))}
    _methods = frozenset(public - _DENIED_METHODS)


def register_function(fn: Callable[..., Any], name: str | None = None) -> Callable[..., Any]:
    """Allow ``fn`` as a ``call_function`` target under ``name``; returns ``fn``.

    ``name`` defaults to ``module.qualname`` and must be a dotted identifier
    that resolves nowhere else.  Use it for pure tensor functions only (the
    allow-list is what keeps a loaded graph from calling anything else), and
    register at import time of the defining module: :func:`resolve_function`
    imports modules under ``fxcompress.`` on demand, nothing else.
    """
    name = name or f"{fn.__module__}.{fn.__qualname__}"
    if not _DOTTED.fullmatch(name):
        raise ArtifactError(f"register_function: {name!r} is not a dotted Python name")
    if _registered.get(name, fn) is not fn:
        raise ArtifactError(f"register_function: {name!r} is already registered to another function")
    _registered[name] = fn
    return fn


def import_fxcompress_module(qualified: str) -> None:
    """Import the module part of ``fxcompress.x.y.Name`` (our own code only)."""
    module = qualified.rpartition(".")[0]
    if _DOTTED.fullmatch(qualified) and (module == "fxcompress" or module.startswith("fxcompress.")):
        try:
            importlib.import_module(module)
        except ImportError:
            pass  # the caller reports the name as unknown


def function_name(fn: Any) -> str:
    """The artifact name of a ``call_function`` target, or ``ArtifactError``."""
    _index()
    for name, registered in _registered.items():
        if registered is fn:
            return name
    if isinstance(fn, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        name = _op_name(fn)
        if name is not None:
            return name
    elif id(fn) in _by_id:
        return _by_id[id(fn)]
    else:
        name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', '?')}"
        if name in _TORCHVISION and resolve_function(name) is fn:
            return name
    raise ArtifactError(
        f"{_describe(fn)} is not on the artifact allow-list of functions. Allowed: torch tensor "
        "functions, torch.ops.aten/onednn ops, operator/math functions and "
        "functions registered with fxcompress.artifact.register_function (for pure tensor functions)."
    )


def _op_name(op: Any) -> str | None:
    packet = op if isinstance(op, torch._ops.OpOverloadPacket) else op._overloadpacket
    ns, _, base = packet._qualified_op_name.partition("::")
    if ns not in _OP_NAMESPACES or base in _DENIED_OPS:
        return None
    name = f"torch.ops.{ns}.{base}"
    return name if op is packet else f"{name}.{op._overloadname}"


def resolve_function(name: str) -> Callable[..., Any]:
    """Map an artifact name back to the allowed object, or raise ``ArtifactError``."""
    _index()
    if name in _by_name:
        return _by_name[name]
    if name.startswith("fxcompress.") and name not in _registered:
        import_fxcompress_module(name)
    if name in _registered:
        return _registered[name]
    if name in _TORCHVISION:
        module, _, attr = name.rpartition(".")
        return getattr(importlib.import_module(module), attr)
    m = _OP_NAME.fullmatch(name)
    if m and m.group(1) in _OP_NAMESPACES and m.group(2) not in _DENIED_OPS:
        ns, base, overload = m.groups()
        try:
            op = getattr(getattr(torch.ops, ns), base)
            return getattr(op, overload) if overload else op
        except (AttributeError, RuntimeError):
            pass
    raise ArtifactError(f"the artifact's graph calls {name!r}, which is not an allowed function here")


def check_method(name: Any) -> str:
    """Return ``name`` if it is an allowed ``call_method`` name, else raise ``ArtifactError``."""
    _index()
    if not isinstance(name, str) or name not in _methods:
        raise ArtifactError(
            f"call_method {name!r} is not an allowed method: public torch.Tensor methods other than "
            f"{sorted(_DENIED_METHODS)} are"
        )
    return name


def _describe(fn: Any) -> str:
    module = getattr(fn, "__module__", None)
    qual = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
    return f"{module}.{qual}" if module else qual
