"""The observer contract and its shared machinery.

Every observer is an ``nn.Module`` whose state is plain tensor buffers (so it
survives ``state_dict``/``load_state_dict`` and ``deepcopy``).  The contract:

* ``forward(x)`` records statistics of ``x`` and returns ``x`` itself,
  unchanged; non-finite values raise :class:`CalibrationError` naming
  ``where`` (a label the graph pass sets to the node name).
* ``calculate_qparams()`` returns ``(scale, zero_point)`` (float32 / int32;
  shape ``[]``, ``[C]`` or ``[C, G]``); it raises ``CalibrationError`` if
  nothing was observed.
* ``merge(other)`` folds another observer's state into this one, so
  calibration can be split across processes (see each class for how exact).

Artifacts store an observer as its spec, its ``where`` label and its state,
exactly (:meth:`Observer._fxc_from_config`): a loaded observer computes the
same qparams and calibrates on exactly as the saved one would have.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from fxcompress.artifact.modules import assign_state
from fxcompress.errors import CalibrationError, ConfigError
from fxcompress.quant import codecs
from fxcompress.quant.qparams import compute_qparams, reduction_view
from fxcompress.quant.spec import QuantSpec

__all__ = ["Observer", "ResizingBuffers"]


class ResizingBuffers:
    """Mixin: ``load_state_dict`` adopts the incoming shape of buffers and parameters.

    Per-channel state has no known shape until the first tensor is seen; this
    lets a fresh module load the state of a calibrated one.  Inference tensors
    (state written under ``inference_mode``) are replaced too, since loading
    copies in place.
    """

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        for name, buf in list(self._buffers.items()):  # type: ignore[attr-defined]
            incoming = state_dict.get(prefix + name)
            if buf is not None and incoming is not None and (
                    incoming.shape != buf.shape or buf.is_inference()):
                self._buffers[name] = torch.empty_like(incoming, dtype=buf.dtype)  # type: ignore[attr-defined]
        for name, param in list(self._parameters.items()):  # type: ignore[attr-defined]
            incoming = state_dict.get(prefix + name)
            if param is not None and incoming is not None and (
                    incoming.shape != param.shape or param.is_inference()):
                self._parameters[name] = nn.Parameter(  # type: ignore[attr-defined]
                    torch.empty_like(incoming, dtype=param.dtype), requires_grad=param.requires_grad)
        super()._load_from_state_dict(state_dict, prefix, *args)  # type: ignore[misc]


class Observer(ResizingBuffers, nn.Module, ABC):
    """Base class: shared checks, labels and the qparams computation.

    Subclasses set ``kind`` (the ``QuantSpec.observer`` value they implement)
    and implement ``_observe``, ``compute_range`` and ``_merge``.
    """

    kind: str = ""
    #: Granularities the subclass handles.
    granularities: tuple[str, ...] = ("per_tensor", "per_channel", "per_group")

    def __init__(self, spec: QuantSpec, where: str = "") -> None:
        super().__init__()
        # The class decides the algorithm; keep the spec honest about it.
        spec = spec.replace(observer=self.kind)
        if spec.granularity not in self.granularities:
            raise ConfigError(
                f"{type(self).__name__} does not support granularity={spec.granularity!r} "
                f"(supported: {self.granularities}); use make_observer(spec)"
            )
        self.spec = spec
        #: Where this observer sits (a node name); used in error messages.
        self.where = where
        self.register_buffer("num_observed", torch.zeros((), dtype=torch.int64))

    @property
    def has_data(self) -> bool:
        """Whether at least one non-empty tensor has been observed (or merged in)."""
        return bool(self.num_observed > 0)

    def _label(self) -> str:
        return f"observer at {self.where!r}" if self.where else f"{type(self).__name__}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Record ``x``'s statistics; return ``x`` unchanged (same object)."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise CalibrationError(
                f"{self._label()}: can only observe floating-point tensors, got {got}; "
                "exclude this value from quantization (scope/skip)"
            )
        if x.numel():
            with torch.no_grad():
                self._observe(x.detach())
            # Out of place, like all state updates: state created under
            # inference_mode must stay updatable outside it.
            self.num_observed = self.num_observed + 1
        return x

    def _extremes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-qparam min and max of ``x`` (float32); raises on NaN/Inf."""
        if self.spec.granularity == "per_tensor":
            # The full reduction is vectorised; aminmax(dim=-1) of a flat view is ~30x slower.
            lo, hi = torch.aminmax(x)
        else:
            lo, hi = torch.aminmax(reduction_view(x, self.spec, where=self.where), dim=-1)
        lo, hi = lo.float(), hi.float()
        # min/max propagate NaN and expose Inf, so this costs no extra pass.
        if not bool(torch.isfinite(lo).all() & torch.isfinite(hi).all()):
            raise CalibrationError(
                f"{self._label()}: the observed tensor contains NaN or Inf; check the "
                "calibration data (normalisation, dtype) and that the float model gives "
                "finite outputs on it"
            )
        return lo, hi

    def _check_shape(self, name: str, current: torch.Tensor, new: torch.Tensor) -> None:
        if current.shape != new.shape:
            raise CalibrationError(
                f"{self._label()}: {name} has shape {tuple(new.shape)} but earlier tensors "
                f"gave {tuple(current.shape)}; every observed tensor must have the same "
                "channel count (and groups)"
            )

    @abstractmethod
    def compute_range(self) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """The ``(min, max)`` range the qparams are computed from (needs data)."""

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` for what was observed, per ``self.spec``."""
        if not self.has_data:
            raise CalibrationError(
                f"{self._label()}: no data was observed; run calibration (with a non-empty "
                "calibration set that reaches this point of the model) first"
            )
        lo, hi = self.compute_range()
        return compute_qparams(lo, hi, self.spec)

    def merge(self, other: "Observer") -> "Observer":
        """Fold ``other``'s state into this observer (in place); returns ``self``."""
        if type(other) is not type(self) or other.spec != self.spec:
            raise ConfigError(
                f"{self._label()}: cannot merge {type(other).__name__}({other.spec}) into "
                f"{type(self).__name__}({self.spec}); merge observers of the same type and spec"
            )
        if other.has_data:
            if self.has_data:
                self._merge(other)
            else:
                self._adopt(other)
            self.num_observed = self.num_observed + other.num_observed
        return self

    def _adopt(self, other: "Observer") -> None:
        for name, buf in other.named_buffers(recurse=False):
            if name != "num_observed":
                setattr(self, name, buf.clone())

    @abstractmethod
    def _observe(self, x: torch.Tensor) -> None:
        """Fold the non-empty, detached tensor ``x`` into the state."""

    @abstractmethod
    def _merge(self, other: "Observer") -> None:
        """Fold ``other``'s state into ours; both have data and the same spec."""

    def extra_repr(self) -> str:
        where = f", where={self.where!r}" if self.where else ""
        return f"spec={self.spec}{where}"

    # -- artifact codec (fxcompress.quant.codecs; each concrete class registers itself) -------------
    #: Leading dims of state created empty that is not one value per qparam (see _fxc_check_state).
    _fxc_leading_dims: dict[str, tuple[int, ...]] = {}

    def _fxc_config(self) -> dict[str, Any]:
        return {"spec": self.spec.to_dict(), "where": self.where}

    @classmethod
    def _fxc_from_config(cls, config: dict[str, Any], state: dict[str, torch.Tensor]) -> "Observer":
        codecs.expect_keys(config, ("spec", "where"))
        spec = codecs.spec_from_config(config["spec"])
        if spec.observer != cls.kind:
            raise codecs.malformed(f"{cls.__name__} holds a spec with observer={spec.observer!r}, "
                                   f"expected {cls.kind!r}")
        observer = cls(spec, codecs.text(config, "where"))
        # State created empty takes its shape from the data observed: checked after loading.
        observed = {n for n, b in observer._buffers.items() if b is not None and tuple(b.shape) == (0,)}
        assign_state(observer, state, resizable=observed)
        observer._fxc_check_state(observed)
        return observer

    def _fxc_check_state(self, observed: set[str]) -> None:
        """Raise unless the state created empty (``observed``) is empty before any data and
        afterwards one value per qparam (after ``_fxc_leading_dims``), of one qparam shape."""
        if int(self.num_observed) < 0:
            raise codecs.malformed(f"{self._label()} has observed {int(self.num_observed)} tensors")
        shapes = {name: tuple(getattr(self, name).shape) for name in sorted(observed)}
        if not self.has_data:
            if any(shape != (0,) for shape in shapes.values()):
                raise codecs.malformed(f"{self._label()} observed nothing but holds state of shapes {shapes}")
            return
        qshapes = set()
        for name, shape in shapes.items():
            leading = self._fxc_leading_dims.get(name, ())
            if shape[:len(leading)] != leading:
                raise codecs.malformed(f"{self._label()} state {name!r} has shape {shape}, expected {leading} + "
                                       "the qparam shape")
            qshapes.add(shape[len(leading):])
        ndim = codecs.QPARAM_NDIM[self.spec.granularity]
        if len(qshapes) > 1 or any(len(q) != ndim or 0 in q for q in qshapes):
            raise codecs.malformed(f"{self._label()} state of shapes {shapes} does not hold one value per "
                                   f"qparam of {self.spec.granularity} quantization")
