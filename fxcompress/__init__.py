"""fxcompress: torch.fx graph-rewriting passes for model compression.

The public face.  A model is captured with :func:`trace`, a pipeline of passes
runs under a verifying :class:`PassManager`, and :func:`run` ties both
together without ever touching the caller's model.

``import fxcompress`` imports nothing of fxcompress's own: every name below,
the subpackages and modules (``fxcompress.recipes``, ``.bench``, ``.quant``,
``.prune``, ``.ops``, ``.macs``, ``.artifact``, ``.budget``, ...), the artifact
functions (:func:`save`, :func:`load`, :func:`verify_artifact`) and
:func:`sensitivity` are imported on first attribute access.  So
``import fxcompress.oplib`` (the operator library a ``torch.export``-ed lowered
model needs) loads that library alone.

``fxcompress.verify`` is the module of graph invariants
(``fxcompress.verify.register_check``, ``stage_of``); calling it,
``fxcompress.verify(path)``, checks an artifact as :func:`verify_artifact`
does, the spelling earlier versions documented.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

__all__ = [
    "run",
    "trace",
    "Result",
    "Report",
    "Pass",
    "PassResult",
    "PassContext",
    "PassManager",
    "function_pass",
    "register",
    "unregister",
    "get_pass",
    "available_passes",
    "finetune",
    "save",
    "load",
    "verify_artifact",
    "verify",
    "errors",
    "sensitivity",
    "export_onnx",
    "__version__",
]

# Names imported on first use: attribute -> (module, attribute in it, or None for the module itself).
_LAZY: dict[str, tuple[str, str | None]] = {
    "save": ("artifact", "save"),
    "load": ("artifact", "load"),
    "verify_artifact": ("artifact", "verify"),
    "finetune": ("train", "finetune"),
    "sensitivity": ("budget", "sensitivity"),
    "export_onnx": ("onnx_export", "export_onnx"),
    "run": ("api", "run"),
    "Result": ("api", "Result"),
    "trace": ("capture", "trace"),
    "PassManager": ("manager", "PassManager"),
    "Report": ("report", "Report"),
    **{name: ("pass_base", name) for name in ("Pass", "PassContext", "PassResult", "function_pass")},
    **{name: ("registry", name) for name in ("available_passes", "get_pass", "register", "unregister")},
    **{name: (name, None) for name in (
        "api", "artifact", "attention_mask", "bench", "boundary", "budget", "capture", "cli", "distill",
        "distributed", "errors", "examples", "macs", "manager", "onnx_export", "oplib", "ops", "pass_base",
        "passes", "prune", "quant", "raising", "recipe_file", "recipes", "registry", "report", "rewrite",
        "train", "verify", "zoo",
    )},
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'fxcompress' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = importlib.import_module(f"{__name__}.{module}")
    if attr is not None:
        value = getattr(value, attr)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
