"""Quantized weighted layers at each stage: observed, fake-quantized, folded.

A conv, linear or embedding module that ``insert_observers`` quantizes is
replaced, at the same module path, by a wrapper holding the original module
and its weight quantizer.  The graph keeps its ``call_module`` node and the
node's target, so scope patterns, metadata and the surrounding graph are
untouched; only the module changes, stage by stage:

* :class:`ObservedLayer` (role ``observer``): the float module plus a
  calibrated weight observer; computes exactly what the float module computes.
* :class:`FakeQuantLayer` (role ``fake_quant``): the float module plus a
  :class:`~fxcompress.quant.fake_quant.FakeQuantize` for its weight; computes
  with ``dequantize(quantize(weight))`` and trains through it (QAT).
* :class:`FoldedLayer` (role ``folded``): integer weight storage (``weight``:
  int8/uint8, or 4-/2-bit values packed into uint8), ``weight_scale`` and
  ``weight_zero_point`` buffers, and the original module emptied of its weight
  (it keeps its float ``bias`` and its hyperparameters).  Computes with the
  dequantized weight: the reference semantics the lowering pass replaces with
  integer kernels.

Each wrapper describes itself (:func:`fxcompress.ops.describe`) as the op of
the module it wraps, so analyses still see a conv / linear / embedding.

Each wrapper saves and loads in artifacts bit for bit (:mod:`fxcompress.quant.codecs`):
the wrapped module and the observer / fake-quant module are described through the
artifact registry, a folded layer's spec is stored and its integer (or packed)
weight kept as it is; on load the weight is checked against the spec (dtype, range,
packed size) and the module's shape, and the qparams against both.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxcompress import macs
from fxcompress.artifact.modules import assign_state, describe_child
from fxcompress.errors import ConfigError
from fxcompress.ops import Kind, describe_module, register_module
from fxcompress.quant import codecs
from fxcompress.quant.fake_quant import FakeQuantize
from fxcompress.quant.int_math import accumulate, rescale
from fxcompress.quant.observer_base import Observer
from fxcompress.quant.observers import MinMaxObserver
from fxcompress.quant.qparams import dequantize, pack_int, quantize, unpack_int
from fxcompress.quant.spec import QuantSpec
from fxcompress.verify import role_of

__all__ = [
    "LAYER_KINDS",
    "layer_support",
    "weighted_forward",
    "ObservedLayer",
    "FakeQuantLayer",
    "FoldedLayer",
    "QUANTIZED_LAYERS",
]

_EPS = torch.finfo(torch.float32).eps
_CONV_TRANSPOSE: dict[int, Callable[..., torch.Tensor]] = {
    1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d,
}
#: The op kinds whose weight a layer wrapper quantizes.
LAYER_KINDS: tuple[Kind, ...] = (Kind.CONV, Kind.LINEAR, Kind.EMBEDDING)


def layer_support(module: nn.Module) -> str | None:
    """Why ``module``'s weight cannot be quantized by a layer wrapper, or None if it can.

    Accepted: what :func:`fxcompress.ops.describe_module` describes as a conv,
    transposed conv, linear or embedding: the torch classes and subclasses that
    keep torch's ``forward`` (such as ``NonDynamicallyQuantizableLinear``), without
    hooks or parametrizations (:mod:`fxcompress.ops.plain`); with a floating-point
    weight, and no ``max_norm`` for embeddings (it renormalises the weight in place).
    """
    if role_of(module) is not None:
        return f"already quantized ({type(module).__name__})"
    info = describe_module(module)
    if info.not_plain is not None and info.not_plain.kind in LAYER_KINDS:
        return info.not_plain.reason
    if info.kind not in LAYER_KINDS:
        return f"{type(module).__name__} is not a conv, linear or embedding module"
    if not isinstance(info.weight, torch.Tensor) or not info.weight.is_floating_point():
        return "the module has no floating-point weight"
    if info.op == "embedding" and module.max_norm is not None:
        return "embedding with max_norm renormalises its weight in place"
    return None


def weighted_forward(module: nn.Module, op: str, x: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """What ``module`` (which computes ``op``, as :func:`~fxcompress.ops.describe_module` says)
    computes on ``x``, with ``weight`` and ``bias`` in place of its own."""
    if op.startswith("conv_transpose"):
        return _CONV_TRANSPOSE[len(module.kernel_size)](x, weight, bias, module.stride, module.padding,
                                                        module.output_padding, module.groups, module.dilation)
    if op.startswith("conv"):
        return module._conv_forward(x, weight, bias)
    if op == "linear":
        return F.linear(x, weight, bias)
    return F.embedding(x, weight, module.padding_idx, None, module.norm_type,
                       module.scale_grad_by_freq, module.sparse)


class _FloatWeightLayer(nn.Module):
    """What the observed and fake-quantized wrappers share: the wrapped module's own
    (float) ``weight`` and ``bias``, the op it computes (``op``), and the artifact codec of
    the two children, the layer (``module``) and its weight quantizer (:attr:`_quantizer`)."""

    module: nn.Module
    op: str
    #: The attribute holding the weight's observer or fake quantizer, and its type.
    _quantizer: tuple[str, type]

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.module, "bias", None)

    # -- artifact codec (fxcompress.quant.codecs) -------------------------------------------------
    def _fxc_config(self) -> dict:
        name = self._quantizer[0]
        return {"module": describe_child("module", self.module), name: describe_child(name, getattr(self, name))}

    @classmethod
    def _stored_children(cls, config: dict, state: dict[str, torch.Tensor]) -> tuple[nn.Module, nn.Module]:
        """The stored layer and weight quantizer, checked against the config's keys."""
        name, kind = cls._quantizer
        codecs.expect_keys(config, ("module", name))
        return _stored_layer(config, state), codecs.child(name, config[name], state, kind)


class ObservedLayer(_FloatWeightLayer):
    """A float conv / linear / embedding with a calibrated weight observer.

    The observer sees the weight once, when the layer is built (a weight is a
    constant), and ``weight_scale`` / ``weight_zero_point`` hold its qparams
    from then on.  ``forward`` is the float module's.
    """

    fxc_role = "observer"
    _quantizer = ("weight_observer", Observer)

    def __init__(self, module: nn.Module, observer: Observer) -> None:
        super().__init__()
        self.module = module
        self.op = describe_module(module).op
        self.weight_observer = observer
        with torch.no_grad():
            observer(module.weight.detach())
        scale, zero_point = observer.calculate_qparams()
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_zero_point", zero_point)
        self.train(module.training)  # a wrapper follows the mode of the module it wraps

    @property
    def spec(self) -> QuantSpec:
        return self.weight_observer.spec

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight's ``(scale, zero_point)``."""
        return self.weight_scale, self.weight_zero_point

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    @classmethod
    def _fxc_from_config(cls, config: dict, state: dict[str, torch.Tensor]) -> "ObservedLayer":
        module, observer = cls._stored_children(config, state)
        # The constructor observes the weight: give it a throwaway min/max observer (cheap),
        # whose qparams fix the shape the stored ones must have, then the stored observer.
        layer = cls(module, MinMaxObserver(observer.spec.replace(observer="minmax")))
        layer.weight_observer = observer
        assign_state(layer, codecs.own_state(state))
        codecs.check_qparams(layer.weight_scale, layer.weight_zero_point, layer.spec, "weight")
        return layer


class FakeQuantLayer(_FloatWeightLayer):
    """A conv / linear / embedding computing with its fake-quantized weight (QAT).

    Gradients reach the float weight through the straight-through estimator
    (and the scale, when learnable); the bias stays float.
    """

    fxc_role = "fake_quant"
    _quantizer = ("weight_fake_quant", FakeQuantize)

    def __init__(self, module: nn.Module, fake_quant: FakeQuantize) -> None:
        super().__init__()
        self.module = module
        self.op = describe_module(module).op
        self.weight_fake_quant = fake_quant
        self.train(module.training)

    @classmethod
    def from_observed(cls, layer: ObservedLayer, *, learnable_scale: bool = False) -> "FakeQuantLayer":
        """Start from the observed layer's qparams (the observer is kept, frozen)."""
        fq = FakeQuantize(layer.spec, layer.weight_observer, learnable=learnable_scale)
        fq.set_qparams(*layer.qparams())
        fq.freeze_observer()
        return cls(layer.module, fq)

    @property
    def spec(self) -> QuantSpec:
        return self.weight_fake_quant.spec

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight's current ``(scale, zero_point)`` (detached; a learnt scale clamped as forward clamps it)."""
        scale, zero_point = self.weight_fake_quant.calculate_qparams()
        return scale.clamp(min=_EPS), zero_point

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return weighted_forward(self.module, self.op, x, self.weight_fake_quant(self.module.weight), self.bias)

    @classmethod
    def _fxc_from_config(cls, config: dict, state: dict[str, torch.Tensor]) -> "FakeQuantLayer":
        module, fake_quant = cls._stored_children(config, state)
        shape = codecs.qparam_shape(fake_quant.spec, tuple(module.weight.shape))
        codecs.check_qparams(fake_quant.scale, fake_quant.zero_point, fake_quant.spec, "weight", shape=shape,
                             empty_ok=True)
        layer = cls(module, fake_quant)
        assign_state(layer, codecs.own_state(state))
        return layer


# The ops a folded layer computes as the int8 kernels do (exact accumulation, then rescaling).
_INTEGER_EXACT_OPS = ("linear", "conv1d", "conv2d", "conv3d")


class FoldedLayer(nn.Module):
    """A conv / linear / embedding whose weight is stored as integers.

    State: ``weight`` (the integer values: ``int8`` signed or ``uint8``
    unsigned for 8, 7, 6, 5 and 3 bits, unpacked in the float weight's shape;
    for 4 and 2 bits the values of the weight flattened in row-major order,
    packed two or four to a ``uint8`` byte by :func:`~fxcompress.quant.pack_int`),
    ``weight_scale`` (float32) and ``weight_zero_point`` (int32) of shape
    ``[]``, ``[C]`` or ``[C, G]`` along ``spec.axis``, and ``module``: the
    original module without its weight (it keeps ``bias`` and every
    hyperparameter).  :meth:`int_weight` gives the unpacked integers,
    :meth:`dequantized_weight` the float weight the forward uses.

    ``op`` is what the wrapped module computes (``"conv2d"``, ``"linear"``, ...).
    ``input_scale`` (set by ``fold_fake_quant`` when the layer's input is the output
    of a quantize-dequantize, else None) makes a conv or linear with per-tensor or
    per-channel weights compute as the int8 kernels do (:mod:`fxcompress.quant.int_math`):
    exact integer accumulation, then the kernels' float32 rescaling, so the lowered
    reference lowering reproduces the folded model bit for bit (and the x86 one within a
    code per op: :mod:`fxcompress.quant.contract`).  That path runs on float32 inputs
    that lie on the input grid (checked on every call; under autograd the gradient is
    the float path's); any other input takes the dequantized float path, which is the
    same value up to float32 rounding.
    """

    fxc_role = "folded"

    def __init__(self, module: nn.Module, q: torch.Tensor, scale: torch.Tensor,
                 zero_point: torch.Tensor, spec: QuantSpec) -> None:
        super().__init__()
        module.weight = None  # the float weight leaves the state: only integers remain
        self.module = module
        self.op = describe_module(module).op
        self.spec = spec
        self.weight_shape = tuple(q.shape)
        self.packed = spec.bits in (2, 4)
        self.register_buffer("weight", pack_int(q.reshape(-1), spec.bits) if self.packed else q.clone())
        self.register_buffer("weight_scale", scale.detach().to(torch.float32).clone())
        self.register_buffer("weight_zero_point", zero_point.detach().to(torch.int32).clone())
        self.register_buffer("input_scale", None)
        self.train(module.training)

    @classmethod
    def fold(cls, layer: ObservedLayer | FakeQuantLayer) -> "FoldedLayer":
        """Quantize the layer's (possibly fine-tuned) weight with its qparams."""
        scale, zero_point = layer.qparams()
        with torch.no_grad():
            q = quantize(layer.module.weight.detach(), scale, zero_point, layer.spec)
        return cls(layer.module, q, scale, zero_point, layer.spec)

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.module, "bias", None)

    def int_weight(self) -> torch.Tensor:
        """The integer weight values, unpacked, in the float weight's shape."""
        if not self.packed:
            return self.weight
        flat = unpack_int(self.weight, self.spec.bits, (math.prod(self.weight_shape),), signed=self.spec.signed)
        return flat.reshape(self.weight_shape)

    def dequantized_weight(self) -> torch.Tensor:
        """``(q - zero_point) * scale`` in float32: the weight the forward computes with."""
        return dequantize(self.int_weight(), self.weight_scale, self.weight_zero_point, axis=self.spec.axis)

    @property
    def integer_exact(self) -> bool:
        """Whether the forward can compute as the int8 kernels do (see the class docstring)."""
        return (self.input_scale is not None and self.weight_scale.dim() <= 1 and self.spec.axis == 0
                and self.op in _INTEGER_EXACT_OPS)

    def widen_weight_scale(self, scale: torch.Tensor) -> None:
        """Store the weight on ``scale`` (``weight_scale``'s shape, no entry smaller): the
        dequantized weight requantized with the same zero point, so each weight moves by at
        most half a step of ``scale`` and stays in the spec's range."""
        scale = scale.detach().to(torch.float32)
        if scale.shape != self.weight_scale.shape or bool((scale < self.weight_scale).any()):
            raise ConfigError(f"widen_weight_scale takes a scale of shape {tuple(self.weight_scale.shape)} "
                              f"no smaller than the current one, got {tuple(scale.shape)}")
        with torch.no_grad():
            q = quantize(self.dequantized_weight(), scale, self.weight_zero_point, self.spec)
            self.weight.copy_(pack_int(q.reshape(-1), self.spec.bits) if self.packed else q)
            self.weight_scale.copy_(scale)

    def set_input_scale(self, scale: torch.Tensor | float | None) -> None:
        """Record the per-tensor scale of the quantized input (None forgets it)."""
        self.input_scale = None if scale is None else torch.as_tensor(scale, dtype=torch.float32).detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.integer_exact and x.dtype == torch.float32:
            codes = torch.round(x.detach() / self.input_scale)  # the input codes minus their zero point
            if torch.equal(codes * self.input_scale, x.detach()):
                exact = self._integer_forward(codes)
                if not (torch.is_grad_enabled() and (x.requires_grad or exact.requires_grad)):
                    return exact
                # Under autograd: the exact value, with the float path's gradient.
                approx = weighted_forward(self.module, self.op, x, self.dequantized_weight(), self.bias)
                return approx + (exact - approx).detach()
        return weighted_forward(self.module, self.op, x, self.dequantized_weight(), self.bias)

    def _integer_forward(self, codes: torch.Tensor) -> torch.Tensor:
        weight = self.int_weight().to(torch.float64)
        if bool(self.weight_zero_point.any()):
            zp = self.weight_zero_point.to(torch.float64)
            weight = weight - (zp.view(-1, *([1] * (weight.dim() - 1))) if zp.dim() else zp)
        acc = accumulate(lambda a, w: weighted_forward(self.module, self.op, a, w, None), codes, weight)
        channel_dim = -1 if self.op == "linear" else 1
        return rescale(acc, self.input_scale, self.weight_scale, self.bias, channel_dim)

    def extra_repr(self) -> str:
        storage = f"packed {self.spec.bits}-bit" if self.packed else str(self.weight.dtype).removeprefix("torch.")
        exact = f", input_scale={float(self.input_scale):.4g}" if self.input_scale is not None else ""
        return (f"bits={self.spec.bits}, signed={self.spec.signed}, symmetric={self.spec.symmetric}, "
                f"granularity={self.spec.granularity}, axis={self.spec.axis}, weight={storage} "
                f"{list(self.weight_shape)}{exact}")

    # -- artifact codec (fxcompress.quant.codecs) -------------------------------------------------
    # Stored: the module without its weight (its config gives the weight's shape), the spec, and
    # the state as it is (packed storage included); rebuilt through the constructor.
    def _fxc_config(self) -> dict:
        return {"module": describe_child("module", self.module, missing=("weight",)), "spec": self.spec.to_dict()}

    @classmethod
    def _fxc_from_config(cls, config: dict, state: dict[str, torch.Tensor]) -> "FoldedLayer":
        codecs.expect_keys(config, ("module", "spec"))
        spec = codecs.spec_from_config(config["spec"])
        module = _stored_layer(config, state, missing=("weight",))
        shape = tuple(module.weight.shape)  # a meta tensor: what the module's config implies
        own = codecs.own_state(state)
        known = {"weight", "weight_scale", "weight_zero_point", "input_scale"}
        if not {"weight", "weight_scale", "weight_zero_point"} <= set(own) <= known:
            raise codecs.malformed(f"FoldedLayer holds tensors {sorted(own)}, expected {sorted(known)} "
                                   "(input_scale optional)")
        stored = own["weight"]
        if spec.bits in (2, 4):
            if stored.dtype != torch.uint8 or stored.dim() != 1:
                raise codecs.malformed(f"{spec.bits}-bit weights are stored packed (1-D uint8), got "
                                       f"{stored.dtype} of shape {tuple(stored.shape)}")
            try:
                codes = unpack_int(stored, spec.bits, (math.prod(shape),), signed=spec.signed).reshape(shape)
            except ConfigError as exc:
                raise codecs.malformed(f"packed weight for shape {shape}: {exc}") from exc
        else:
            if tuple(stored.shape) != shape:
                raise codecs.malformed(f"weight has shape {tuple(stored.shape)}, its module's config implies {shape}")
            codes = stored
        codecs.check_codes(codes, spec, "weight")
        codecs.check_qparams(own["weight_scale"], own["weight_zero_point"], spec, "weight",
                             shape=codecs.qparam_shape(spec, shape))
        layer = cls(module, codes, own["weight_scale"], own["weight_zero_point"], spec)
        if "input_scale" in own:
            input_scale = own["input_scale"]
            if input_scale.dtype != torch.float32 or input_scale.dim() != 0:
                raise codecs.malformed(f"input_scale must be a float32 scalar, got {input_scale.dtype} of shape "
                                       f"{tuple(input_scale.shape)}")
            layer.set_input_scale(input_scale)
        assign_state(layer, own)  # the stored tensors themselves, not the constructor's copies
        return layer


def _stored_layer(config: dict, state: dict[str, torch.Tensor], missing: tuple[str, ...] = ()) -> nn.Module:
    """The wrapped conv / linear / embedding of a stored layer wrapper, refused unless a wrapper could hold it."""
    module = codecs.child("module", config["module"], state, nn.Module, missing=missing)
    reason = layer_support(module)
    if reason is not None:
        raise codecs.malformed(f"a quantized layer cannot wrap this {type(module).__name__}: {reason}")
    return module


#: The layer wrapper classes, one per stage.
QUANTIZED_LAYERS: tuple[type[nn.Module], ...] = (ObservedLayer, FakeQuantLayer, FoldedLayer)


def _wrapped_op(layer: nn.Module) -> tuple[Kind, str, dict]:
    """describe() of a wrapper is describe() of the module it wraps."""
    info = describe_module(layer.module)
    return info.kind, info.op, dict(info.params)


def _count_layer_macs(gm: fx.GraphModule, node: fx.Node) -> dict[str, int]:
    """The MACs of the wrapped layer (a folded layer's float weight is gone: use its shape)."""
    layer = gm.get_submodule(str(node.target))
    weight_shape = getattr(layer, "weight_shape", None) or tuple(layer.module.weight.shape)
    if layer.op.startswith("conv"):
        return macs.count_conv(gm, node, weight_shape, layer.op.startswith("conv_transpose"))
    if layer.op == "linear":
        return macs.count_linear(gm, node, layer.module.in_features)
    return {}  # an embedding is a lookup: no multiply-accumulates


# Registered here, next to the classes: describe(), MACs and artifacts know every wrapper.
for _cls in QUANTIZED_LAYERS:
    register_module(_cls, _wrapped_op)
    macs.register_module(_cls, _count_layer_macs)
    codecs.register(_cls)  # storable in artifacts
