"""``FakeQuantize``: quantize-dequantize in float, trainable (QAT).

The forward pass computes exactly ``dequantize(quantize(x))`` with the
module's qparams (bit for bit what the lowered integer model sees), so a
fake-quantized model predicts its lowered model's outputs.  Gradients:

* ``x``: straight-through estimator, 1 where ``round(x * (1 / scale) + zero_point)``
  lies in ``[qmin, qmax]``, 0 where the value is clipped.
* ``scale`` (``learnable=True`` only): the LSQ gradient (Esser et al., 2020),
  ``round(x/s) - x/s`` inside the range and ``qmin - zp`` / ``qmax - zp``
  when clipped, scaled by ``1 / sqrt(elements_per_scale * qmax)``.  The zero
  point stays fixed.

Artifacts store the observer (through the registry), both switches, whether the
scale is learnable, and the qparams as they are (:mod:`fxcompress.quant.codecs`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from fxcompress.artifact.modules import assign_state, describe_child
from fxcompress.errors import CalibrationError, ConfigError
from fxcompress.quant import codecs
from fxcompress.quant.observer_base import Observer, ResizingBuffers
from fxcompress.quant.observers import make_observer
from fxcompress.quant.qparams import apply_per_qparam, fake_quantize
from fxcompress.quant.spec import QuantSpec

__all__ = ["FakeQuantize"]

_EPS = torch.finfo(torch.float32).eps


def _without_observer(spec: QuantSpec) -> dict:
    """The spec's fields except the observer kind (which the observer class fixes)."""
    fields = spec.to_dict()
    del fields["observer"]
    return fields


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``factor`` (LSQ's gradient scale)."""

    @staticmethod
    def forward(ctx, x, factor):  # type: ignore[override]
        ctx.factor = factor
        return x.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad * ctx.factor, None


class FakeQuantize(ResizingBuffers, nn.Module):
    """Fake-quantizes its input with qparams from an observer (or learnt).

    Two switches, both on by default:

    * observing (:meth:`enable_observer` / :meth:`freeze_observer`): each
      forward feeds the observer and recomputes ``scale``/``zero_point``
      from it.  Cheap with min/max or moving-average observers; a histogram
      observer re-runs its range search every step.  With ``learnable=True``
      the observer overwrites the learnt scale while it is enabled, so freeze
      it before training the scale.
    * fake quantization (:meth:`enable_fake_quant`): when off, the input is
      returned unchanged.

    ``scale`` is a buffer, or an ``nn.Parameter`` when ``learnable``;
    ``zero_point`` is an int32 buffer.  Their shape (``[]``, ``[C]`` or
    ``[C, G]``) is known once qparams are first set; build the optimizer after
    that (:meth:`from_observer` sets them at construction).
    """

    def __init__(self, spec: QuantSpec, observer: Optional[Observer] = None, *,
                 learnable: bool = False, where: str = "") -> None:
        super().__init__()
        if observer is None:
            observer = make_observer(spec, where)
        elif _without_observer(observer.spec) != _without_observer(spec):
            raise ConfigError(
                f"FakeQuantize spec {spec} does not match its observer's spec {observer.spec}; "
                "pass the observer's spec (or no observer)"
            )
        self.spec = observer.spec
        self.observer = observer
        self.learnable = learnable
        self.observer_enabled = True
        self.fake_quant_enabled = True
        if learnable:
            self.scale = nn.Parameter(torch.ones(0))
        else:
            self.register_buffer("scale", torch.ones(0))
        self.register_buffer("zero_point", torch.zeros(0, dtype=torch.int32))

    @classmethod
    def from_observer(cls, observer: Observer, *, learnable: bool = False,
                      observe: bool = False) -> "FakeQuantize":
        """A fake-quant module starting from a calibrated ``observer``'s qparams.

        The observer is kept (for :meth:`enable_observer`) and frozen unless
        ``observe``.  Raises ``CalibrationError`` if it observed nothing.
        """
        module = cls(observer.spec, observer, learnable=learnable)
        module.set_qparams(*observer.calculate_qparams())
        module.observer_enabled = observe
        return module

    @property
    def where(self) -> str:
        """The observer's location label (used in error messages)."""
        return self.observer.where

    @property
    def has_qparams(self) -> bool:
        """Whether ``scale``/``zero_point`` have been set."""
        return self.scale.numel() > 0

    def enable_observer(self, enabled: bool = True) -> "FakeQuantize":
        """Switch observing (and qparams updates) on or off."""
        self.observer_enabled = enabled
        return self

    def freeze_observer(self) -> "FakeQuantize":
        """Stop observing; the current qparams stay (and train, if learnable)."""
        return self.enable_observer(False)

    def enable_fake_quant(self, enabled: bool = True) -> "FakeQuantize":
        """Switch fake quantization on or off (off: forward is the identity)."""
        self.fake_quant_enabled = enabled
        return self

    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Set the qparams (a learnable scale keeps its Parameter when shapes agree).

        The stored tensors are normal tensors even under ``inference_mode``,
        so a module calibrated there can be trained afterwards.
        """
        with torch.inference_mode(False):
            scale = scale.detach().to(torch.float32).clone()
            if self.learnable and self.scale.shape == scale.shape and not self.scale.is_inference():
                with torch.no_grad():
                    self.scale.copy_(scale)
            elif self.learnable:
                self.scale = nn.Parameter(scale)
            else:
                self.scale = scale
            self.zero_point = zero_point.detach().to(torch.int32).clone()

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The current ``(scale, zero_point)`` (detached), as folding needs them."""
        if not self.has_qparams:
            raise CalibrationError(self._missing())
        return self.scale.detach().clone(), self.zero_point.clone()

    def _missing(self) -> str:
        at = f" at {self.where!r}" if self.where else ""
        return (f"FakeQuantize{at} has no qparams: calibrate its observer first, or enable "
                "observing for at least one forward pass")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer_enabled:
            self.observer(x.detach())
            self.set_qparams(*self.observer.calculate_qparams())
        if not self.fake_quant_enabled:
            return x
        if not self.has_qparams:
            raise CalibrationError(self._missing())
        if not self.learnable:
            return fake_quantize(x, self.scale, self.zero_point, self.spec)
        return self._learnable_fake_quantize(x)

    def _learnable_fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        qmin, qmax = self.spec.qmin, self.spec.qmax
        per_scale = x.numel() / self.scale.numel()
        scale = _ScaleGrad.apply(self.scale.clamp(min=_EPS),
                                 1.0 / math.sqrt(per_scale * max(qmax, 1)))

        def lsq(v: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
            # x * (1/s) + zp, rounded as quantize() rounds (see qparams); round()
            # with an identity gradient: the sum equals round(shifted) exactly.
            shifted = v * torch.reciprocal(s) + z
            rounded = shifted + (torch.round(shifted) - shifted).detach()
            return (torch.clamp(rounded, qmin, qmax) - z) * s

        out = apply_per_qparam(x.float(), scale, self.zero_point, self.spec.granularity,
                               self.spec.axis, lsq)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"spec={self.spec}, learnable={self.learnable}, "
                f"observer_enabled={self.observer_enabled}, "
                f"fake_quant_enabled={self.fake_quant_enabled}")

    # -- artifact codec (fxcompress.quant.codecs) -------------------------------------------------
    def _fxc_config(self) -> dict:
        return {"observer": describe_child("observer", self.observer), "learnable": self.learnable,
                "observer_enabled": self.observer_enabled, "fake_quant_enabled": self.fake_quant_enabled}

    @classmethod
    def _fxc_from_config(cls, config: dict, state: dict[str, torch.Tensor]) -> "FakeQuantize":
        codecs.expect_keys(config, ("observer", "learnable", "observer_enabled", "fake_quant_enabled"))
        observer = codecs.child("observer", config["observer"], state, Observer)
        module = cls(observer.spec, observer, learnable=codecs.flag(config, "learnable"))
        module.observer_enabled = codecs.flag(config, "observer_enabled")
        module.fake_quant_enabled = codecs.flag(config, "fake_quant_enabled")
        assign_state(module, codecs.own_state(state), resizable=("scale", "zero_point"))
        codecs.check_qparams(module.scale, module.zero_point, module.spec, "FakeQuantize", empty_ok=True)
        return module


codecs.register(FakeQuantize)
