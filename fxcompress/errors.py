"""The exceptions a user of fxcompress can see.

Every failure a user can cause raises one of these, with a message that says
*what* was wrong, *where* (module path, node, pass, file member) and *what to
do*.  They all derive from :class:`FxCompressError`, so one ``except`` catches
any of them; the ones about bad arguments also derive from ``ValueError`` so
that generic callers keep working.
"""

from __future__ import annotations

__all__ = [
    "FxCompressError",
    "TraceError",
    "InputError",
    "ConfigError",
    "PassError",
    "CalibrationError",
    "CalibrationDataError",
    "LoweringError",
    "IntegrityError",
    "ArtifactError",
    "MetricError",
    "ExportError",
    "DistributedError",
]


class FxCompressError(Exception):
    """Base class of every error fxcompress raises on purpose."""


class TraceError(FxCompressError):
    """The model could not be captured into a ``GraphModule``.

    The message names the module path and source line where tracing failed and
    the remedy to try (``leaf_modules``, ``concrete_args`` or ``autowrap``).
    """


class InputError(FxCompressError, ValueError):
    """Example inputs or data batches do not fit the model (shape, dtype, type)."""


class ConfigError(FxCompressError, ValueError):
    """A pipeline, pass option, spec or recipe is invalid; raised before any work."""


class PassError(FxCompressError):
    """A pass failed or left the graph in a state the verifier rejects.

    The message names the pass, the passes that ran before it, and the reason.
    """


class CalibrationError(FxCompressError):
    """Calibration could not produce valid statistics (no data, NaN/Inf, ...)."""


class CalibrationDataError(CalibrationError, InputError):
    """A calibration batch does not fit the model or holds NaN/Inf (names the batch and input).

    Both a :class:`CalibrationError` and an :class:`InputError`: the data, not
    the pipeline, is what to fix.
    """


class LoweringError(FxCompressError):
    """A graph cannot be lowered to integer kernels as requested."""


class IntegrityError(FxCompressError):
    """A saved artifact is corrupt, tampered with, or wrongly signed."""


class ArtifactError(FxCompressError):
    """A model cannot be saved, or a file is not an fxcompress artifact."""


class MetricError(FxCompressError, ValueError):
    """An ``eval_fn`` returned something that is not a finite number (None, a string, NaN, Inf)."""


class ExportError(FxCompressError):
    """A model cannot be written for another runtime (ONNX): a module with no mapping there,
    an opset too old for what the model needs, an exporter failure; nothing is written."""


class DistributedError(FxCompressError):
    """A run across processes failed: a rank raised (every rank then raises this, naming it),
    the ranks disagree about the model or data, or the process group cannot carry the tensors."""


def _install_in_operator_library() -> None:
    # The operator library (fxcompress.oplib) imports torch only; under fxcompress its
    # operators raise these classes, as the lowered modules did before it existed.
    from fxcompress.oplib.errors import use_error_classes

    use_error_classes(input=InputError, config=ConfigError, kernel=LoweringError)


_install_in_operator_library()
