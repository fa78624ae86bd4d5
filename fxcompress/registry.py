"""The pass registry: names to pass classes.

Three sources:

1. built-in passes, one module per pass in ``fxcompress.passes`` (the
   top-level ``passes/`` folder), imported lazily the first time their name
   is looked up: file name == pass name;
2. third-party passes advertised through the entry-point group
   ``fxcompress.passes`` (``name = "pkg.module:PassClass"``), loaded lazily
   the same way;
3. passes registered in-process with :func:`register` (user passes).

A name belongs to one pass: :func:`register` refuses a name that a built-in,
an entry point or another registered class already uses, so no pass can be
shadowed silently.  A class defined again at the same place (a notebook cell
run twice: same module and qualified name) replaces the one registered
before; ``register(cls, replace=True)`` replaces any registered user pass,
and :func:`unregister` removes one.  Built-in and entry-point passes can be
neither replaced nor removed.  Looking names up never imports anything but
the one pass asked for.
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib import metadata
from types import ModuleType
from typing import Any

from .errors import ConfigError
from .pass_base import Pass, close_matches

__all__ = ["ENTRY_POINT_GROUP", "register", "unregister", "get_pass", "available_passes", "close_matches"]

ENTRY_POINT_GROUP = "fxcompress.passes"
_BUILTIN_PACKAGE = "fxcompress.passes"
_registered: dict[str, type[Pass]] = {}


def _qualified(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _check_pass_class(cls: object, where: str) -> type[Pass]:
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        raise ConfigError(f"{where}: expected a Pass subclass, got {cls!r}")
    if not (cls.name and cls.name.isidentifier() and cls.name == cls.name.lower()):
        raise ConfigError(f"{where}: pass class {cls.__qualname__} needs a snake_case `name`, got {cls.name!r}")
    return cls


def register(cls: type[Pass] | None = None, *, replace: bool = False) -> Any:
    """Register a pass class under its ``name`` (usable as a decorator); returns the class.

    Registering the same class again is a no-op, and a class defined again at
    the same place (same module and qualified name: a notebook cell re-run)
    replaces the earlier one.  ``replace=True`` (``@register(replace=True)``)
    replaces any registered user pass of that name.  A name used by a built-in
    pass or an installed entry point, or (without ``replace``) by a different
    registered class, is a ConfigError naming the owner.
    """
    if cls is None:  # @register(replace=True)
        return lambda c: register(c, replace=replace)
    cls = _check_pass_class(cls, "register()")
    name = cls.name
    existing = _registered.get(name)
    if existing is cls:
        return cls
    builtin = f"{_BUILTIN_PACKAGE}.{name}"
    hint = ""
    if name in _builtin_names() and cls.__module__ != builtin:
        owner = f"the built-in pass {builtin}"
    elif existing is not None and (existing.__module__ == builtin or _is_entry_point(existing)):
        owner = f"the built-in pass {builtin}" if existing.__module__ == builtin else _qualified(existing)
    elif existing is not None and not (replace or _qualified(existing) == _qualified(cls)):
        owner = _qualified(existing)
        hint = f", or replace it: register(cls, replace=True), or unregister({name!r}) first"
    elif existing is None and name in (eps := _entry_points()) and eps[name].value != _qualified(cls):
        owner = f"the entry point {eps[name].value}"
    else:
        _registered[name] = cls
        return cls
    raise ConfigError(f"cannot register {_qualified(cls)}: the pass name {name!r} is taken by {owner}; "
                      f"choose another name{hint}")


def unregister(name: str) -> type[Pass]:
    """Remove a user-registered pass; returns its class.

    ConfigError for a built-in or entry-point pass (they cannot be removed)
    and for a name that is not registered.
    """
    cls = _registered.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ConfigError(f"no registered pass is called {name!r}{close_matches(str(name), _registered)}")
    if cls.__module__ == f"{_BUILTIN_PACKAGE}.{name}" or _is_entry_point(cls):
        origin = "is built in" if cls.__module__.startswith(_BUILTIN_PACKAGE) else "comes from an entry point"
        raise ConfigError(f"pass {name!r} {origin}; only passes registered in-process can be unregistered")
    del _registered[name]
    return cls


def _is_entry_point(cls: type) -> bool:
    ep = _entry_points().get(cls.name)
    return ep is not None and ep.value == _qualified(cls)


def _builtin_names() -> list[str]:
    package = importlib.import_module(_BUILTIN_PACKAGE)
    return sorted(m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_"))


def _entry_points() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def available_passes() -> list[str]:
    """Every pass name that :func:`get_pass` can resolve, sorted (imports nothing)."""
    return sorted(set(_registered) | set(_builtin_names()) | set(_entry_points()))


def get_pass(name: str) -> type[Pass]:
    """The pass class named ``name``; ConfigError with close matches if there is none."""
    if not isinstance(name, str):
        raise ConfigError(f"a pass name is a str, got {type(name).__name__} {name!r}")
    if name in _registered:
        return _registered[name]
    if name in _builtin_names():
        module = importlib.import_module(f"{_BUILTIN_PACKAGE}.{name}")
        return register(_pass_class_in(module, name))
    eps = _entry_points()
    if name in eps:
        where = f"entry point {name!r} ({eps[name].value}) of group {ENTRY_POINT_GROUP!r}"
        try:
            cls = eps[name].load()
        except Exception as exc:
            raise ConfigError(f"{where} cannot be loaded: {type(exc).__name__}: {exc}") from exc
        cls = _check_pass_class(cls, where)
        if cls.name != name:
            raise ConfigError(f"{where} names a pass called {cls.name!r}; the entry point name must equal it")
        return register(cls)
    known = available_passes()
    raise ConfigError(
        f"unknown pass {name!r}{close_matches(name, known)}; available passes: {', '.join(known) or '(none)'}"
    )


def _pass_class_in(module: ModuleType, name: str) -> type[Pass]:
    """The Pass subclass named ``name`` defined in a built-in pass module."""
    for value in vars(module).values():
        if (isinstance(value, type) and issubclass(value, Pass) and value.name == name
                and value.__module__ == module.__name__):
            return value
    raise ConfigError(f"built-in pass module {module.__name__} defines no Pass named {name!r}; "
                      f"a built-in pass's name must equal its file name")
