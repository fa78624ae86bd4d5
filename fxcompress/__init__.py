"""fxcompress: torch.fx graph-rewriting passes for model compression.

The public face.  A model is captured with :func:`trace`, a pipeline of passes
runs under a verifying :class:`PassManager`, and :func:`run` ties both
together without ever touching the caller's model.
"""

from __future__ import annotations

from . import errors
from .api import Result, run
from .capture import trace
from .manager import PassManager
from .pass_base import Pass, PassContext, PassResult, function_pass
from .registry import available_passes, get_pass, register
from .report import Report
from .train import finetune
from .artifact import load, save, verify
from .sensitivity import sensitivity

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
    "get_pass",
    "available_passes",
    "finetune",
    "save",
    "load",
    "verify",
    "errors",
    "sensitivity",
    "__version__",
]
