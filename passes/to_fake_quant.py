"""``to_fake_quant``: calibrated observers become fake-quant modules, for quantization-aware training."""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from fxcompress.errors import ConfigError
from fxcompress.ops import Kind, describe
from fxcompress.pass_base import Pass, PassContext, PassResult
from fxcompress.quant.activations import ActivationFakeQuant, ActivationObserver
from fxcompress.quant.layers import FakeQuantLayer, ObservedLayer
from fxcompress.rewrite import replace_modules

__all__ = ["ToFakeQuant"]


@dataclass(frozen=True)
class ToFakeQuant(Pass):
    """Replaces every observed layer by a layer that computes with its fake-quantized weight,
    and every activation observer by a fake-quant module, each starting from the calibrated
    qparams; the model then computes what the quantized model will, and trains (QAT).

    Gradients pass the rounding by the straight-through estimator; with
    ``learnable_scale`` the scales are parameters trained with the LSQ gradient,
    otherwise they stay fixed (the observers are kept, frozen).  BatchNorm is folded
    first, not simulated: a BatchNorm still reading a quantized layer's output
    raises ConfigError (run ``fuse_conv_bn`` before ``insert_observers``), so the
    weights fake-quantized during training are exactly those that will be folded.
    Stats: ``layers``, ``activations`` (modules converted).
    """

    name = "to_fake_quant"
    requires = ("calibrate",)

    learnable_scale: bool = False

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        _refuse_unfolded_batchnorm(gm)
        learnable = self.learnable_scale
        layers = replace_modules(gm, lambda _, m: FakeQuantLayer.from_observed(m, learnable_scale=learnable)
                                 if isinstance(m, ObservedLayer) else None)
        activations = replace_modules(gm, lambda _, m: ActivationFakeQuant.from_observer(m, learnable_scale=learnable)
                                      if isinstance(m, ActivationObserver) else None)
        return PassResult(gm, bool(layers or activations), {"layers": layers, "activations": activations})


def _refuse_unfolded_batchnorm(gm: fx.GraphModule) -> None:
    """ConfigError if a BatchNorm normalises a quantized layer's output (it should have been folded)."""
    for node in gm.graph.nodes:
        info = describe(node, gm)
        if info.kind is not Kind.NORM or info.op != "batch_norm" or not isinstance(info.inputs[0], fx.Node):
            continue
        source = info.inputs[0]
        if source.op == "call_module" and isinstance(gm.get_submodule(str(source.target)), ObservedLayer):
            raise ConfigError(
                f"BatchNorm {node.name!r} normalises the output of quantized layer {source.target!r}; "
                f"quantization-aware training folds BatchNorm first: run fuse_conv_bn before insert_observers"
            )
