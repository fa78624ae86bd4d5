"""The pass protocol: :class:`Pass`, :class:`PassResult`, :class:`PassContext`.

A pass is a frozen dataclass whose fields are its options.  It has a
snake_case ``name`` equal to the file it lives in, a docstring saying what it
establishes, and ``__call__(gm, ctx) -> PassResult``.  Options are validated
when the pass is constructed (``__post_init__`` raises
:class:`~fxcompress.errors.ConfigError`), so a pipeline fails before any work.

Class attributes a pass may set:

``requires``
    names of passes that must run earlier in the same pipeline (or in an
    earlier :func:`fxcompress.run` on the same graph).
``provides``
    names of passes whose work this pass includes (it runs them itself), so
    that later passes requiring them may follow it.
``exact``
    the rewrite must not change outputs beyond float round-off; the manager
    checks it numerically under ``check="full"``.
``eval_only``
    the rewrite is only valid for a model in eval mode (e.g. folding
    BatchNorm); the manager refuses, with a ConfigError, a model with any
    module in training mode.
``needs``
    the :func:`fxcompress.run` inputs the pass cannot work without, by their
    :class:`PassContext` field names (``"calibration_data"``, ``"loss_fn"``,
    ``"eval_fn"``); a tuple, or a property when it depends on the options.
    The manager refuses a pipeline that lacks one, before any work.  A pass
    whose needs depend on the passes before it overrides
    :meth:`Pass.needs_after` instead.
``stages``
    the graph stages (:data:`fxcompress.verify.STAGES`) the pass runs on, or
    None for any; stages only move forward, so the manager refuses, before
    any work, a graph that is already past all of them.
``runs_before``
    names of passes that must not run earlier in the pipeline (or in an
    earlier run on the same graph): the mirror of ``requires``, e.g. pruning
    cannot follow quantization.
``float32_only``
    the pass computes for float32 models only; the manager refuses, before
    any work, floating parameters or example inputs of another dtype.

Errors name the pass once, and the machinery does it, never the pass: a
:class:`~fxcompress.errors.FxCompressError` from ``__post_init__`` gains
``pass 'name': `` (:meth:`Pass.__init_subclass__` wraps it, so a pass built
directly says it too), and one from ``__call__`` gains
``pass 'name' (after ...): `` from the :class:`~fxcompress.manager.PassManager`
(:func:`name_the_pass`).  A pass's own messages say what, where and what to do.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import functools
import inspect
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Mapping, Sequence

import torch
from torch import fx

from .errors import ConfigError, FxCompressError, PassError
from .verify import STAGES, stage_of

__all__ = [
    "Pass",
    "PassResult",
    "PassContext",
    "function_pass",
    "module_path_of",
    "check_option_types",
    "close_matches",
    "check_choice",
    "path_matches",
    "name_the_pass",
]


def name_the_pass(exc: FxCompressError, where: str, name: str) -> FxCompressError:
    """``exc``'s type (a CalibrationError stays one) with its message prefixed by ``where``,
    which names pass ``name``; a message that already starts with ``pass 'name': `` (its
    options' check named it) loses that first, so the pass is named once."""
    message = str(exc)
    own = f"pass {name!r}: "
    if message.startswith(own):
        message = message[len(own):]
    try:
        return type(exc)(f"{where}: {message}")
    except TypeError:  # a subclass whose constructor takes more than a message
        return PassError(f"{where} failed: {type(exc).__name__}: {message}")


def _naming_the_pass(post_init: Callable[[Any], None]) -> Callable[[Any], None]:
    """``post_init`` whose fxcompress errors name the pass (see the module docstring)."""
    @functools.wraps(post_init)
    def checked(self: "Pass") -> None:
        try:
            post_init(self)
        except FxCompressError as exc:
            if str(exc).startswith(f"pass {self.name!r}"):  # a parent's check, already named
                raise
            raise name_the_pass(exc, f"pass {self.name!r}", self.name).with_traceback(exc.__traceback__) from None
    checked._fxc_names_the_pass = True  # type: ignore[attr-defined]
    return checked


@dataclass
class PassResult:
    """What a pass returns.

    ``modified`` is computed from what was actually rewritten, never asserted;
    ``stats`` is a small JSON-able dict that the report shows (a ``"notes"``
    list in it is copied into the report's notes).
    """

    gm: fx.GraphModule
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)


class Pass:
    """Base class of every pass.  Subclasses are ``@dataclass(frozen=True)``."""

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()
    provides: ClassVar[tuple[str, ...]] = ()
    exact: ClassVar[bool] = False
    eval_only: ClassVar[bool] = False
    needs: ClassVar[tuple[str, ...]] = ()
    stages: ClassVar[tuple[str, ...] | None] = None
    runs_before: ClassVar[tuple[str, ...]] = ()
    float32_only: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")
        if own is not None and not getattr(own, "_fxc_names_the_pass", False):
            cls.__post_init__ = _naming_the_pass(own)  # type: ignore[attr-defined]

    def __call__(self, gm: fx.GraphModule, ctx: "PassContext") -> PassResult:
        raise NotImplementedError(f"pass {self.name!r} does not implement __call__")

    def check_stage(self, gm: fx.GraphModule, remedy: str, stages: tuple[str, ...] | None = None) -> None:
        """ConfigError saying ``remedy`` when ``gm`` is past ``stages`` (default: the pass's own
        ``stages``, which the manager checks on a pipeline's input graph before any work; this
        checks the graph the pass is given)."""
        stages = stages or self.stages
        stage = stage_of(gm)
        if stages is not None and STAGES.index(stage) > max(STAGES.index(s) for s in stages):
            raise ConfigError(f"the graph is already {stage} (it holds quantization modules); {remedy}")

    def needs_after(self, earlier: "Sequence[Pass]") -> tuple[str, ...]:
        """What the pass needs when ``earlier`` run before it in the pipeline (default: ``needs``)."""
        return tuple(self.needs)

    # -- options -----------------------------------------------------------
    @classmethod
    def option_fields(cls) -> dict[str, dataclasses.Field]:
        """The pass's options: its dataclass fields, by name."""
        if not dataclasses.is_dataclass(cls):
            return {}
        return {f.name: f for f in dataclasses.fields(cls) if f.init}

    def options(self) -> dict[str, Any]:
        """The option values of this instance (JSON-able where the types are)."""
        return {name: getattr(self, name) for name in self.option_fields()}

    @classmethod
    def doc(cls) -> str:
        """The first paragraph of the docstring: what the pass establishes."""
        text = inspect.getdoc(cls) or ""
        return text.split("\n\n")[0].replace("\n", " ")

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{self.name}({opts})"


def module_path_of(node: fx.Node) -> str:
    """The dotted path of the module a node belongs to ('' for the root).

    ``call_module`` nodes are their own target.  Other nodes use the innermost
    entry of ``node.meta['nn_module_stack']`` that symbolic tracing records,
    and ``get_attr`` nodes the module that owns the attribute.
    """
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = next(reversed(stack.values()))
        return path[0] if isinstance(path, tuple) else str(path)
    if node.op == "get_attr":
        return str(node.target).rpartition(".")[0]
    return ""


def path_matches(path: str, pattern: str) -> bool:
    """A pattern matches a module path itself or anything inside it ("layer3" covers "layer3.0.conv1")."""
    return fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path, pattern + ".*")


@dataclass
class PassContext:
    """What a pass may need beyond the graph.

    ``example_args``/``example_kwargs`` are the normalised example inputs;
    ``teacher`` is the model that distillation (``finetune(distill=...)``) learns from.  ``scope``
    and ``skip`` are set by the manager for the pass currently running; passes
    ask :meth:`in_scope` instead of reading them.
    """

    example_args: tuple = ()
    example_kwargs: dict = field(default_factory=dict)
    calibration_data: Iterable | None = None
    eval_fn: Callable[[torch.nn.Module], float] | None = None
    loss_fn: Callable[..., torch.Tensor] | None = None
    teacher: torch.nn.Module | None = None
    backend: str = "x86"
    seed: int = 0
    progress: bool = True
    scope: tuple[str, ...] = ()
    skip: tuple[str, ...] = ()

    def in_scope(self, node_or_path: fx.Node | str) -> bool:
        """Whether the current pass may touch this node (or module path).

        With no ``scope`` everything is in scope; ``skip`` always wins.
        Patterns are fnmatch-style module paths ("layer3.*", "fc"); a pattern
        also covers everything inside the module it names.
        """
        path = node_or_path if isinstance(node_or_path, str) else module_path_of(node_or_path)
        if any(path_matches(path, p) for p in self.skip):
            return False
        return not self.scope or any(path_matches(path, p) for p in self.scope)

    def example_inputs(self) -> tuple[tuple, dict]:
        """``(args, kwargs)`` to call the model with."""
        return self.example_args, self.example_kwargs


def close_matches(word: str, candidates: Iterable[str]) -> str:
    """A ' (did you mean ...?)' suffix for error messages, or ''."""
    found = difflib.get_close_matches(word, list(candidates), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(repr(f) for f in found)}?)" if found else ""


def check_choice(option: str, value: Any, choices: Iterable[Any]) -> None:
    """Raise ``ConfigError`` unless ``value`` is one of ``choices`` (a pass option's allowed values)."""
    choices = tuple(choices)
    if value not in choices:
        near = close_matches(value, map(str, choices)) if isinstance(value, str) else ""
        raise ConfigError(f"{option} must be one of {choices}, got {value!r}{near}")


# -- function passes ---------------------------------------------------------------
def function_pass(
    name: str | Callable | None = None,
    *,
    requires: tuple[str, ...] = (),
    exact: bool = False,
    eval_only: bool = False,
) -> Any:
    """Turn ``def f(gm, ctx, *, opt: T = default, ...)`` into a pass class.

    Usable bare (``@function_pass``) or with arguments
    (``@function_pass("my_pass", exact=True)``); the pass name defaults to the
    function's name.  The keyword-only parameters (annotations and defaults)
    become the dataclass fields, i.e. the pass's options; any other parameter
    besides ``gm`` and ``ctx`` is a ConfigError, as is an option without a
    default or with a mutable default (use a tuple).  ``f`` returns a
    :class:`PassResult`, or the ``GraphModule`` (then ``modified`` is whether
    the printed graph changed: a rewrite of weights alone must return a
    PassResult to say so).  The class is not registered: pass it to
    :func:`fxcompress.register` to use it by name, or put it in a pipeline
    directly.
    """
    if callable(name):  # used bare: @function_pass
        return function_pass()(name)

    def wrap(fn: Callable) -> type[Pass]:
        pass_name = name or fn.__name__
        if not (pass_name.isidentifier() and pass_name == pass_name.lower()):
            raise ConfigError(f"function pass name must be snake_case, got {pass_name!r}")
        fields_ = _option_fields_of(fn, pass_name)

        def __call__(self: Pass, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
            before = str(gm.graph)
            out = fn(gm, ctx, **self.options())
            if isinstance(out, PassResult):
                return out
            if not isinstance(out, fx.GraphModule):
                raise PassError("a function pass must return a GraphModule or a PassResult, "
                                f"got {type(out).__name__}")
            return PassResult(out, str(out.graph) != before, {})

        return dataclasses.make_dataclass(
            "".join(part.title() for part in pass_name.split("_")),
            fields_,
            bases=(Pass,),
            frozen=True,
            namespace={
                "name": pass_name,
                "requires": tuple(requires),
                "exact": exact,
                "eval_only": eval_only,
                "__call__": __call__,
                "__doc__": fn.__doc__ or f"Function pass {pass_name}.",
                "__module__": fn.__module__,
            },
        )

    return wrap


def _option_fields_of(fn: Callable, pass_name: str) -> list[tuple[str, Any, Any]]:
    """The dataclass fields of a function pass: its keyword-only parameters."""
    try:
        hints = inspect.get_annotations(fn, eval_str=True)
    except Exception:  # an annotation naming something local: keep the strings, skip type checks
        hints = inspect.get_annotations(fn)
    params = list(inspect.signature(fn).parameters.values())
    positional = [p for p in params if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    if len(positional) != 2 or any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in positional):
        raise ConfigError(
            f"function pass {pass_name!r} must be def {fn.__name__}(gm, ctx, *, option=default, ...): "
            f"options are keyword-only, after '*'"
        )
    fields_ = []
    for p in params[2:]:
        if p.default is inspect.Parameter.empty:
            raise ConfigError(f"function pass {pass_name!r}: option {p.name!r} needs a default")
        if isinstance(p.default, (list, dict, set)):
            raise ConfigError(f"function pass {pass_name!r}: option {p.name!r} has a mutable default "
                              f"{p.default!r}; use a tuple or None")
        fields_.append((p.name, hints.get(p.name, Any), field(default=p.default)))
    return fields_


# -- option checking ----------------------------------------------------------------
def check_option_types(cls: type[Pass], options: Mapping[str, Any]) -> dict[str, Any]:
    """Validate option names and types; return the options with lists made tuples.

    Raises ConfigError for an unknown option (listing the valid ones, with
    close matches) or a value of the wrong type.  A list given for a
    ``tuple[...]`` option (as JSON and TOML recipes spell it) becomes a tuple,
    so the frozen pass stays hashable.
    """
    fields_ = cls.option_fields()
    hints = _type_hints(cls)
    out = {}
    for key, value in options.items():
        if key not in fields_:
            valid = ", ".join(fields_) or "(none)"
            raise ConfigError(
                f"pass {cls.name!r} has no option {key!r}{close_matches(key, fields_)}; valid options: {valid}"
            )
        expected = hints.get(key)
        if expected is not None and not _isinstance_loose(value, expected):
            raise ConfigError(
                f"pass {cls.name!r}: option {key!r} must be {_type_name(expected)}, "
                f"got {type(value).__name__} {value!r}"
            )
        out[key] = tuple(value) if isinstance(value, list) and _wants_tuple(expected) else value
    return out


def _type_hints(cls: type) -> dict[str, Any]:
    """Resolved annotations of the option fields; unresolvable ones are left out (not checked)."""
    try:
        return typing.get_type_hints(cls)
    except Exception:
        return {f.name: f.type for f in dataclasses.fields(cls) if not isinstance(f.type, str)} \
            if dataclasses.is_dataclass(cls) else {}


def _wants_tuple(tp: Any) -> bool:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_wants_tuple(a) for a in typing.get_args(tp))
    return tp is tuple or typing.get_origin(tp) is tuple


def _isinstance_loose(value: Any, tp: Any) -> bool:
    """isinstance for the annotation forms options use (Union, Literal, tuple[...], ...)."""
    if tp is Any or tp is None:
        return True
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_isinstance_loose(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (tuple, list, typing.Sequence) or tp in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return False
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return all(_isinstance_loose(v, args[0]) for v in value)
        if origin is tuple and args:
            return len(args) == len(value) and all(map(_isinstance_loose, value, args))
        return not args or all(_isinstance_loose(v, args[0]) for v in value)
    if origin in (dict, typing.Mapping) or tp is dict:
        return isinstance(value, dict)
    if origin is not None:
        try:
            return isinstance(value, origin)
        except TypeError:
            return True
    try:
        return isinstance(value, tp)
    except TypeError:  # a typing construct isinstance cannot check: accept, __post_init__ decides
        return True


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is not None or isinstance(tp, types.UnionType):
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
