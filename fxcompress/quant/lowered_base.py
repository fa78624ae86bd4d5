"""The base class of the lowered integer modules: plain-tensor state, operators of the library.

A lowered module keeps only plain tensors as state (int8/uint8 weights, float32 scales and
biases, int32 zero points as in :mod:`fxcompress.quant.qparams`) and computes with one
operator of fxcompress's operator library (:mod:`fxcompress.oplib`): eagerly it calls the
operator's implementation directly (the dispatcher's Python round trip costs about as
much as a small op), under ``torch.compile``, ``torch.export`` and ``torch.jit.trace`` the
registered ``torch.ops.fxcompress.*`` operator (:func:`run_op`). Its ``forward`` holds no
data-dependent Python, so compilers see the operator call with the module's tensors.

Everything derived from the state (oneDNN's prepacked weights, which are opaque tensors
that cannot be deep-copied, pickled, ``torch.save``-d, put in safetensors or exported;
dequantized reference weights) lives in the library's cache (:mod:`fxcompress.oplib.cache`),
keyed by the weight tensor and the version counters of the tensors it was derived from:
never in ``state_dict()``, never carried by a copy, rebuilt on the next call after
``load_state_dict``, ``.to()`` or any in-place edit of the state.

Every subclass declares the ``"lowered"`` stage role (``fxc_role``, read by
:mod:`fxcompress.verify`) and is registered with :mod:`fxcompress.artifact` when its class
is created, so lowered graphs save and load as artifacts: stored as ``config()`` plus
``state_dict()``, rebuilt by the constructor and ``load_state_dict``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

import fxcompress.oplib
from fxcompress.artifact.modules import assign_state, register_module
from fxcompress.errors import ArtifactError, ConfigError, LoweringError

__all__ = ["ARITHMETICS", "BACKENDS", "LoweredModule", "BinaryCodesModule", "as_pair", "check_arithmetic",
           "check_post_op", "check_qparams", "quantize_weight_int8", "run_op", "summarize"]

#: ``x86``: oneDNN/aten integer kernels where their preconditions hold, reference elsewhere.
#: ``reference``: portable torch ops only (dequantize, float compute, requantize).
BACKENDS = ("x86", "reference")
#: How the ops that have a choice round: ``onednn`` (the default: oneDNN's kernels' order,
#: :mod:`fxcompress.oplib.arith`) or ``onnxruntime`` (its QLinear kernels' order, so that a QDQ
#: export computes the same codes there: :mod:`fxcompress.oplib.arith_onnxruntime`).
ARITHMETICS = ("onednn", "onnxruntime")
_IMPLEMENTATIONS = fxcompress.oplib.library.IMPLEMENTATIONS


def check_arithmetic(arithmetic: str, problem: str | None = None) -> str:
    """``arithmetic`` if it is one of :data:`ARITHMETICS` and ``problem`` (why this module cannot
    compute onnxruntime's arithmetic) does not forbid it; else a :class:`ConfigError`."""
    if arithmetic not in ARITHMETICS:
        raise ConfigError(f"arithmetic must be one of {ARITHMETICS}, got {arithmetic!r}")
    if arithmetic == "onnxruntime" and problem is not None:
        raise ConfigError(f"arithmetic='onnxruntime' is not available here: {problem}")
    return arithmetic


def check_post_op(post_op: str, args: Sequence[float], table: dict[str, int]) -> tuple[float, ...]:
    """``args`` as floats if ``post_op`` is in ``table`` (name -> number of scalars) and takes
    that many; else a :class:`ConfigError`."""
    if post_op not in table:
        raise ConfigError(f"post_op must be one of {', '.join(table)}; got {post_op!r}")
    if len(args) != table[post_op]:
        raise ConfigError(f"post_op {post_op!r} takes {table[post_op]} arguments, got {tuple(args)}")
    return tuple(float(a) for a in args)


def run_op(name: str, *args: Any) -> Any:
    """Operator ``name`` of the library on ``args``: its implementation itself when run
    eagerly; the registered ``torch.ops.fxcompress`` operator while a compiler or tracer
    records the call (``torch.export``, ``torch.jit.trace``, ``torch.compile``), except under
    ``torch.compile`` with inductor's freezing on, where the int8 layers and the quantize
    steps are traced as the oneDNN calls and elementwise ops they run
    (:mod:`fxcompress.oplib.frozen`). The same computation every way, but for a fused residual
    sum compiled with freezing: the reference arithmetic there, within one code of an x86
    kernel that rounds its own way (AMX)."""
    if torch.jit.is_tracing():
        return getattr(torch.ops.fxcompress, name)(*args)
    if torch.compiler.is_compiling():
        from fxcompress.oplib import frozen  # imports torch._dynamo, loaded by now

        return frozen.operator(name)(*args)
    return _IMPLEMENTATIONS[name](*args)


def as_pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """An int or a 2-sequence of ints as a pair (conv/pool hyper-parameters)."""
    if isinstance(value, int):
        return (value, value)
    pair = tuple(int(v) for v in value)
    if len(pair) != 2:
        raise ConfigError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair  # type: ignore[return-value]


def check_qparams(scale: float, zero_point: int, what: str) -> None:
    """Raise :class:`ConfigError` unless ``(scale, zero_point)`` is a valid uint8 qparam pair."""
    if not (0.0 < float(scale) < float("inf")):
        raise ConfigError(f"{what} scale must be positive and finite, got {float(scale)}")
    if not 0 <= int(zero_point) <= 255:
        raise ConfigError(f"{what} zero point must be in [0, 255] (uint8), got {int(zero_point)}")


def summarize(t: torch.Tensor) -> str:
    """A short text for a scale/zero-point tensor in a ``repr``."""
    if t.numel() == 1:
        return f"{t.item():.4g}"
    f = t.float()
    return f"[{f.min().item():.3g}..{f.max().item():.3g}]x{t.numel()}"


def quantize_weight_int8(w: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel (dim 0); oneDNN ignores weight zero points."""
    scale = torch.as_tensor(scale, dtype=torch.float32).detach().flatten()
    if scale.numel() != w.shape[0] or not bool((scale > 0).all() and scale.isfinite().all()):
        raise LoweringError(f"weight_scale must hold {w.shape[0]} positive finite values "
                            f"(one per output channel), got shape {tuple(scale.shape)}")
    q = torch.round(w.detach().float() / scale.view(-1, *([1] * (w.dim() - 1))))
    return q.clamp_(-128, 127).to(torch.int8), scale


class LoweredModule(nn.Module):
    """Base of every lowered module.

    Guarantees: ``state_dict()`` holds plain tensors only; ``type(m)(**m.config())``
    followed by ``load_state_dict(m.state_dict())`` rebuilds an equal module; copies and
    loads never use a stale or opaque kernel cache.
    """

    #: The verifier's stage role: a graph holding one of these is a lowered graph.
    fxc_role = "lowered"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        register_module(cls)  # artifact name: "<module>.<qualname>", imported on load

    def __init__(self, backend: str) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend

    #: The kernel call chosen for the last eager input (:mod:`fxcompress.quant.eager_plan`), if any.
    _eager_plan: Any = None

    def __setattr__(self, name: str, value: Any) -> None:
        # Any configuration or state change may change which kernel a call takes: choose again.
        if name != "_eager_plan":
            self.__dict__.pop("_eager_plan", None)
        super().__setattr__(name, value)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_eager_plan", None)  # holds oneDNN's opaque packed weight: never copied or saved
        return state

    def config(self) -> dict[str, Any]:
        """The constructor keyword arguments (JSON-serialisable) that rebuild this module."""
        raise NotImplementedError(f"{type(self).__name__} must define config()")

    def _fxc_config(self) -> dict[str, Any]:
        return self.config()

    @classmethod
    def _fxc_from_config(cls, config: dict[str, Any], state: dict[str, torch.Tensor]) -> LoweredModule:
        """Rebuild from the constructor config, then install the stored tensors themselves
        (not copies, unlike ``load_state_dict``), so tensors an artifact stores once for
        several modules (one weight for every call site of a layer) stay shared."""
        module = cls(**config)
        by_owner: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in state.items():
            owner, _, name = key.rpartition(".")
            by_owner.setdefault(owner, {})[name] = tensor
        for path, sub in module.named_modules():  # submodules (an attention's projections) too
            assign_state(sub, by_owner.pop(path, {}))
            if isinstance(sub, LoweredModule):
                sub.reset_cache()
        if by_owner:
            raise ArtifactError(f"malformed artifact: {cls.__qualname__} has no submodules {sorted(by_owner)} "
                                f"for the tensors stored under them")
        return module

    @property
    def use_kernels(self) -> bool:
        """Whether the operators may take the integer kernels (``backend="x86"``)."""
        return self.backend == "x86"

    def reset_cache(self) -> None:
        """Forget this module's packed weights; the next call rebuilds them. Edits through
        ``load_state_dict`` or in place (outside inference mode) are seen without it."""
        fxcompress.oplib.forget(*self.buffers(recurse=False))
        self.__dict__.pop("_eager_plan", None)

    def register_qparams(self, prefix: str) -> None:
        """Register ``{prefix}_scale`` (float32, 0-d) and ``{prefix}_zero_point`` (int32, 0-d)."""
        self.register_buffer(f"{prefix}_scale", torch.ones((), dtype=torch.float32))
        self.register_buffer(f"{prefix}_zero_point", torch.zeros((), dtype=torch.int32))

    def set_qparams(self, prefix: str, scale: float | torch.Tensor, zero_point: int | torch.Tensor) -> None:
        """Validate and store a uint8 qparam pair registered by :meth:`register_qparams`."""
        scale, zero_point = float(scale), int(zero_point)
        check_qparams(scale, zero_point, f"{type(self).__name__} {prefix}")
        getattr(self, f"{prefix}_scale").fill_(scale)
        getattr(self, f"{prefix}_zero_point").fill_(zero_point)

    def load_float_layer(self, layer: nn.Module, weight_scale: torch.Tensor, input_qparams: tuple,
                         output_qparams: tuple | None) -> None:
        """Fill this module from the float conv/linear ``layer``: its weight quantized to int8 by
        ``weight_scale`` (one per output channel), its bias, and the uint8 input and (unless
        None: a float32 output) output qparams."""
        self.load_float_weights(layer, weight_scale)
        self.set_qparams("input", *input_qparams)
        if output_qparams is not None:
            self.set_qparams("output", *output_qparams)

    def load_float_weights(self, layer: nn.Module, weight_scale: torch.Tensor) -> None:
        """Fill ``weight`` (int8 codes by ``weight_scale``, one per output channel),
        ``weight_scale`` and ``bias`` from the float conv/linear ``layer``."""
        q, scale = quantize_weight_int8(layer.weight, weight_scale)
        self.weight.copy_(q)
        self.weight_scale.copy_(scale)
        if layer.bias is not None:
            self.bias.copy_(layer.bias.detach())

    def qparams(self, prefix: str) -> tuple[float, int]:
        """A registered qparam pair as Python scalars."""
        return (float(getattr(self, f"{prefix}_scale")), int(getattr(self, f"{prefix}_zero_point")))


class BinaryCodesModule(LoweredModule):
    """Base of the lowered ops of two uint8 activations: qparams ``input`` (``a``), ``other``
    (``b``) and ``output``, and the ``arithmetic`` they round with."""

    def __init__(self, backend: str, arithmetic: str) -> None:
        super().__init__(backend)
        self.arithmetic = check_arithmetic(arithmetic)
        self.register_qparams("input")
        self.register_qparams("other")
        self.register_qparams("output")

    @classmethod
    def from_qparams(cls, input_qparams: tuple[float, int], other_qparams: tuple[float, int],
                     output_qparams: tuple[float, int], **config: Any) -> BinaryCodesModule:
        """Build from ``(scale, zero_point)`` pairs of ``a``, ``b`` and the result (``config``:
        the constructor's keywords)."""
        m = cls(**config)
        m.set_qparams("input", *input_qparams)
        m.set_qparams("other", *other_qparams)
        m.set_qparams("output", *output_qparams)
        return m
