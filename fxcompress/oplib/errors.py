"""The errors the operator library raises, and how fxcompress makes them its own.

The library imports torch only, so it cannot raise :mod:`fxcompress.errors` classes
itself. It raises the classes below; when fxcompress is imported it installs its own
classes in their place (:func:`use_error_classes`), so a model run through fxcompress
raises ``fxcompress.errors.InputError`` and friends, exactly as before the library
existed, while a deployment that imports only torch and this library gets these.
"""

from __future__ import annotations

from typing import NoReturn

__all__ = ["OpInputError", "OpConfigError", "KernelError", "use_error_classes", "fail"]


class OpInputError(ValueError):
    """An input the operator cannot take (a NaN/Inf image, a wrong dtype or shape)."""


class OpConfigError(ValueError):
    """An operator argument that names nothing the library knows (an unknown post-op)."""


class KernelError(RuntimeError):
    """A kernel's precondition does not hold; the matching ``supports_*`` says so in advance."""


_CLASSES: dict[str, type[Exception]] = {"input": OpInputError, "config": OpConfigError, "kernel": KernelError}


def use_error_classes(*, input: type[Exception], config: type[Exception], kernel: type[Exception]) -> None:
    """Raise these classes from now on (fxcompress installs ``InputError``, ``ConfigError``
    and ``LoweringError``)."""
    _CLASSES.update(input=input, config=config, kernel=kernel)


def fail(kind: str, message: str) -> NoReturn:
    """Raise the error class installed for ``kind`` (``input``, ``config`` or ``kernel``)."""
    raise _CLASSES[kind](message)
