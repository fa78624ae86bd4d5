"""The pass registry: names to pass classes.

Three sources, in this order of precedence:

1. passes registered in-process with :func:`register` (user passes);
2. built-in passes, one module per pass in ``fxcompress.passes`` (the
   top-level ``passes/`` folder), imported lazily the first time a name is
   looked up — file name == pass name;
3. third-party passes advertised through the entry-point group
   ``fxcompress.passes`` (``name = "pkg.module:PassClass"``).
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from importlib import metadata
from typing import Iterable

from .errors import ConfigError
from .pass_base import Pass

__all__ = ["register", "get_pass", "available_passes", "close_matches"]

ENTRY_POINT_GROUP = "fxcompress.passes"
_registered: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Register a pass class under its ``name`` (usable as a decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        raise ConfigError(f"register() takes a Pass subclass, got {cls!r}")
    if not cls.name or not cls.name.isidentifier() or cls.name.lower() != cls.name:
        raise ConfigError(f"pass class {cls.__qualname__} needs a snake_case `name`, got {cls.name!r}")
    existing = _registered.get(cls.name)
    if existing is not None and existing is not cls:
        raise ConfigError(
            f"a pass named {cls.name!r} is already registered ({existing.__module__}); choose another name"
        )
    _registered[cls.name] = cls
    return cls


def _builtin_names() -> list[str]:
    import fxcompress.passes as builtins

    return sorted(m.name for m in pkgutil.iter_modules(builtins.__path__) if not m.name.startswith("_"))


def _entry_points() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def available_passes() -> list[str]:
    """Every pass name that :func:`get_pass` can resolve, sorted."""
    return sorted(set(_registered) | set(_builtin_names()) | set(_entry_points()))


def close_matches(word: str, candidates: Iterable[str]) -> str:
    """A ' (did you mean ...?)' suffix for error messages, or ''."""
    found = difflib.get_close_matches(word, list(candidates), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(repr(f) for f in found)}?)" if found else ""


def get_pass(name: str) -> type[Pass]:
    """The pass class registered under ``name``; ConfigError with close matches if none."""
    if name in _registered:
        return _registered[name]
    if name in _builtin_names():
        module = importlib.import_module(f"fxcompress.passes.{name}")
        return register(_pass_class_in(module, name))
    eps = _entry_points()
    if name in eps:
        cls = eps[name].load()
        if not (isinstance(cls, type) and issubclass(cls, Pass)) or cls.name != name:
            raise ConfigError(
                f"entry point {name!r} ({eps[name].value}) must name a Pass subclass whose name is {name!r}"
            )
        return register(cls)
    known = available_passes()
    raise ConfigError(
        f"unknown pass {name!r}{close_matches(name, known)}; registered passes: {', '.join(known)}"
    )


def _pass_class_in(module: object, name: str) -> type[Pass]:
    for value in vars(module).values():
        if isinstance(value, type) and issubclass(value, Pass) and value.name == name:
            return value
    raise ConfigError(f"built-in pass module {module.__name__} defines no Pass named {name!r}")
