"""Activation quantization points at each stage: observer, fake-quant, quantize-dequantize.

``insert_observers`` puts one ``call_module`` node after each value the
lowered graph will hold as integers; a module may be called at several nodes
when those values must share qparams (the inputs of a ``cat``).  The module
at that target changes class stage by stage, the nodes stay:

* :class:`ActivationObserver` (role ``observer``): returns its input unchanged
  and records it; :meth:`~ActivationObserver.finalize` (run once by
  ``calibrate``) computes the qparams into ``scale`` / ``zero_point``.
* :class:`ActivationFakeQuant` (role ``fake_quant``): a
  :class:`~fxcompress.quant.fake_quant.FakeQuantize` started from those qparams.
* :class:`QDQ` (role ``folded``): ``dequantize(quantize(x))`` with constant
  ``scale`` / ``zero_point`` buffers: the explicit quantize -> dequantize pair
  of a folded graph.

:func:`quant_source` finds, for any value of a folded graph, the QDQ node whose
qparams it carries (through the ops that preserve qparams).

All three save and load in artifacts bit for bit (:mod:`fxcompress.quant.codecs`);
an observer keeps its statistics, so a model saved halfway through calibration
calibrates on to the same qparams after loading.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from fxcompress.artifact.modules import assign_state, describe_child
from fxcompress.errors import CalibrationError
from fxcompress.ops import Kind, OpInfo, describe, register_module
from fxcompress.quant import codecs
from fxcompress.quant.fake_quant import FakeQuantize
from fxcompress.quant.observer_base import Observer
from fxcompress.quant.qparams import fake_quantize
from fxcompress.quant.spec import QuantSpec

__all__ = [
    "ActivationObserver",
    "ActivationFakeQuant",
    "QDQ",
    "ACTIVATION_QUANTIZERS",
    "PRESERVING_KINDS",
    "grid_padding",
    "preserves_qparams",
    "quant_source",
]


_EPS = torch.finfo(torch.float32).eps


def _normal(t: torch.Tensor) -> torch.Tensor:
    """A normal tensor: state written under ``inference_mode`` cannot be updated in place later."""
    if not t.is_inference():
        return t
    with torch.inference_mode(False):
        return t.clone()


class ActivationObserver(nn.Module):
    """Observes the activations at its call sites (returns each input unchanged).

    ``where`` (the observed node names) labels error messages.  Until
    :meth:`finalize` runs, ``scale`` and ``zero_point`` are empty.
    """

    fxc_role = "observer"
    #: forward records statistics: dead-node elimination must not drop a call.
    fxc_impure = True

    def __init__(self, observer: Observer) -> None:
        super().__init__()
        self.observer = observer
        self.register_buffer("scale", torch.ones(0))
        self.register_buffer("zero_point", torch.zeros(0, dtype=torch.int32))

    @property
    def spec(self) -> QuantSpec:
        return self.observer.spec

    @property
    def where(self) -> str:
        return self.observer.where

    @where.setter
    def where(self, label: str) -> None:
        self.observer.where = label

    @property
    def calibrated(self) -> bool:
        """Whether :meth:`finalize` has computed the qparams."""
        return self.scale.numel() > 0

    def finalize(self) -> None:
        """Compute the qparams once (a histogram's range search runs here, not per batch).

        Also turns state recorded under ``inference_mode`` into normal tensors.
        Raises :class:`CalibrationError` naming the node if nothing was observed.
        """
        for name, buf in list(self.observer.named_buffers(recurse=False)):
            setattr(self.observer, name, _normal(buf))
        if not self.observer.has_data:
            raise CalibrationError(
                f"the observer at {self.where!r} saw no data: no calibration batch reached this "
                f"point of the model; give calibration data that exercises it, or skip the layers "
                f"around it"
            )
        scale, zero_point = self.observer.calculate_qparams()
        self.scale, self.zero_point = _normal(scale), _normal(zero_point)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)``; CalibrationError before calibration."""
        if not self.calibrated:
            raise CalibrationError(f"the observer at {self.where!r} is not calibrated: run calibrate first")
        return self.scale, self.zero_point

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.observer(x)

    def extra_repr(self) -> str:
        return f"calibrated={self.calibrated}"

    # -- artifact codec (fxcompress.quant.codecs): a loaded observer calibrates on exactly --------
    def _fxc_config(self) -> dict:
        return {"observer": describe_child("observer", self.observer)}

    @classmethod
    def _fxc_from_config(cls, config: dict, state: dict[str, torch.Tensor]) -> "ActivationObserver":
        codecs.expect_keys(config, ("observer",))
        module = cls(codecs.child("observer", config["observer"], state, Observer))
        assign_state(module, codecs.own_state(state), resizable=("scale", "zero_point"))
        codecs.check_qparams(module.scale, module.zero_point, module.spec, "activation", empty_ok=True)
        return module


class ActivationFakeQuant(nn.Module):
    """Fake-quantizes the activations at its call sites (QAT)."""

    fxc_role = "fake_quant"

    def __init__(self, fake_quant: FakeQuantize) -> None:
        super().__init__()
        self.fake_quant = fake_quant

    @classmethod
    def from_observer(cls, observer: ActivationObserver, *, learnable_scale: bool = False) -> "ActivationFakeQuant":
        """Start from a calibrated observer's qparams, observer frozen."""
        fq = FakeQuantize(observer.spec, observer.observer, learnable=learnable_scale)
        fq.set_qparams(*observer.qparams())
        fq.freeze_observer()
        return cls(fq).train(observer.training)

    @property
    def spec(self) -> QuantSpec:
        return self.fake_quant.spec

    @property
    def where(self) -> str:
        return self.fake_quant.where

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The current ``(scale, zero_point)`` (detached; a learnt scale clamped as forward clamps it)."""
        scale, zero_point = self.fake_quant.calculate_qparams()
        return scale.clamp(min=_EPS), zero_point

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fake_quant(x)

    # -- artifact codec (fxcompress.quant.codecs) -------------------------------------------------
    def _fxc_config(self) -> dict:
        return {"fake_quant": describe_child("fake_quant", self.fake_quant)}

    @classmethod
    def _fxc_from_config(cls, config: dict, state: dict[str, torch.Tensor]) -> "ActivationFakeQuant":
        codecs.expect_keys(config, ("fake_quant",))
        module = cls(codecs.child("fake_quant", config["fake_quant"], state, FakeQuantize))
        assign_state(module, codecs.own_state(state))
        return module


class QDQ(nn.Module):
    """``dequantize(quantize(x))`` with constant qparams: a folded activation quantization point.

    ``scale`` (float32) and ``zero_point`` (int32) are buffers of shape ``[]``
    (activations are quantized per tensor); ``spec`` gives the integer range
    (``spec.qmin`` .. ``spec.qmax``) and dtype (``spec.dtype``).
    """

    fxc_role = "folded"

    def __init__(self, spec: QuantSpec, scale: torch.Tensor, zero_point: torch.Tensor, where: str = "") -> None:
        super().__init__()
        self.spec = spec
        self.where = where
        self.register_buffer("scale", scale.detach().to(torch.float32).clone())
        self.register_buffer("zero_point", zero_point.detach().to(torch.int32).clone())

    @classmethod
    def from_quantizer(cls, quantizer: ActivationObserver | ActivationFakeQuant) -> "QDQ":
        return cls(quantizer.spec, *quantizer.qparams(), where=quantizer.where).train(quantizer.training)

    def same_qparams(self, other: "QDQ") -> bool:
        """Whether ``other`` quantizes exactly as this one does."""
        return (self.spec.qmin, self.spec.qmax, self.spec.dtype) == (other.spec.qmin, other.spec.qmax,
                                                                     other.spec.dtype) \
            and torch.equal(self.scale, other.scale) and torch.equal(self.zero_point, other.zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize(x, self.scale, self.zero_point, self.spec)

    def extra_repr(self) -> str:
        return (f"bits={self.spec.bits}, dtype={str(self.spec.dtype).removeprefix('torch.')}, "
                f"scale={float(self.scale.reshape(-1)[0]):.4g}, zero_point={int(self.zero_point.reshape(-1)[0])}")

    # -- artifact codec (fxcompress.quant.codecs) -------------------------------------------------
    def _fxc_config(self) -> dict:
        return {"spec": self.spec.to_dict(), "where": self.where}

    @classmethod
    def _fxc_from_config(cls, config: dict, state: dict[str, torch.Tensor]) -> "QDQ":
        codecs.expect_keys(config, ("spec", "where"))
        spec = codecs.spec_from_config(config["spec"])
        own = codecs.own_state(state)
        if set(own) != {"scale", "zero_point"}:
            raise codecs.malformed(f"QDQ holds tensors {sorted(own)}, expected ['scale', 'zero_point']")
        codecs.check_qparams(own["scale"], own["zero_point"], spec, "QDQ")
        module = cls(spec, own["scale"], own["zero_point"], codecs.text(config, "where"))
        assign_state(module, own)  # the stored tensors themselves, not the constructor's copies
        return module


#: The activation quantizer classes, one per stage.
ACTIVATION_QUANTIZERS: tuple[type[nn.Module], ...] = (ActivationObserver, ActivationFakeQuant, QDQ)

register_module(QDQ, lambda m: (Kind.ACTIVATION, "quantize_dequantize", {}))
for _cls in ACTIVATION_QUANTIZERS:  # storable in artifacts
    codecs.register(_cls)

#: Op kinds whose output holds values of their first input only (rearranged, selected,
#: or their maximum), so it is quantized exactly when, and as, that input is.
PRESERVING_KINDS = (Kind.IDENTITY, Kind.RESHAPE, Kind.PERMUTE, Kind.SPLIT, Kind.GETITEM)
_PRESERVING_POOLS = ("max_pool1d", "max_pool2d", "max_pool3d",
                     "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d")


def grid_padding(info: OpInfo) -> bool:
    """Whether ``info`` is a spatial pad whose new values lie on its input's grid: zeros (the
    zero point's code, which every affine grid holds) or copies (reflect, replicate, circular)."""
    if info.kind is not Kind.POOL or info.op != "pad":
        return False
    mode = info.params.get("mode", "constant")
    return mode in ("reflect", "replicate", "circular") or (mode == "constant" and not info.params.get("value"))


def preserves_qparams(node: fx.Node, gm: fx.GraphModule) -> fx.Node | None:
    """The input whose qparams ``node``'s output carries, or None.

    True of ops whose output values are values of their first data input:
    no-ops at inference (eval-mode dropout, identity, contiguous, clone),
    reshapes, permutes, split/chunk/getitem, max pooling without indices, and
    spatial padding with zeros or copies (:func:`grid_padding`).
    For such an op ``op(dequantize(q)) == dequantize(op(q))`` exactly, so a
    quantized input makes a quantized output with the same qparams.
    """
    if node.op not in ("call_module", "call_function", "call_method"):
        return None
    info = describe(node, gm)
    pooled = info.kind is Kind.POOL and (info.op in _PRESERVING_POOLS and not info.params.get("return_indices")
                                         or grid_padding(info))
    if info.kind not in PRESERVING_KINDS and not pooled:
        return None
    if info.kind is Kind.IDENTITY and info.params.get("training"):
        return None
    source = info.inputs[0] if info.inputs else None
    return source if isinstance(source, fx.Node) else None


def quant_source(node: fx.Node, gm: fx.GraphModule) -> fx.Node | None:
    """The quantizer node (observer, fake-quant or QDQ call) whose qparams ``node``'s value carries.

    ``node`` itself when it is one; else, through ops that preserve qparams
    (:func:`preserves_qparams`), the quantizer their input chain starts from;
    for a ``cat`` whose inputs all carry the same quantizer module, that of its
    first input.  None for a value that is not quantized.
    """
    while True:
        if node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), ACTIVATION_QUANTIZERS):
            return node
        info = describe(node, gm) if node.op in ("call_function", "call_method") else None
        if info is not None and info.kind is Kind.CONCAT and info.op == "cat":
            sources = [quant_source(i, gm) if isinstance(i, fx.Node) else None for i in info.inputs]
            if sources and all(s is not None for s in sources) and len({s.target for s in sources}) == 1:
                return sources[0]
            return None
        source = preserves_qparams(node, gm)
        if source is None:
            return None
        node = source
