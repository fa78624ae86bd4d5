"""``fold_fake_quant``: integer weight storage and explicit quantize-dequantize activations."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import fx, nn

from fxcompress.pass_base import Pass, PassContext, PassResult
from fxcompress.quant.activations import QDQ, ActivationFakeQuant, ActivationObserver, preserves_qparams, quant_source
from fxcompress.quant.layers import FakeQuantLayer, FoldedLayer, ObservedLayer
from fxcompress.rewrite import replace_modules

__all__ = ["FoldFakeQuant", "BIAS_CODE_LIMIT"]

#: The largest magnitude a folded layer's bias may take on its int32 accumulator grid: below
#: 2**31 by more than any 8-bit accumulator of up to 16,000 inputs per output (2**30), so an
#: int32 runtime adding the two cannot overflow.
BIAS_CODE_LIMIT = 2 ** 30


@dataclass(frozen=True)
class FoldFakeQuant(Pass):
    """Replaces every observed or fake-quantized layer by a folded layer that stores its weight
    as integers (int8/uint8, or 4-/2-bit values packed into bytes) with scale and zero point
    buffers, and every activation observer or fake-quant module by a constant
    quantize-dequantize (:class:`~fxcompress.quant.activations.QDQ`); afterwards the only
    float weights are those of layers deliberately kept float.

    The folded graph computes what the fake-quantized graph computes (it dequantizes
    its integer weights; the lowering pass swaps in integer kernels), so after
    ``to_fake_quant`` its outputs are unchanged (but where the fake-quant graph's
    float32 accumulation crossed a rounding tie), and after ``calibrate`` they become
    the quantized model's.  A quantize-dequantize whose input already carries equal
    qparams (directly, or through ops that preserve them) is idempotent and removed.
    Observers that were never calibrated raise
    :class:`~fxcompress.errors.CalibrationError`.  Each folded layer whose input is a
    quantize-dequantize output (directly or through ops that keep its grid) records
    that input's scale, and then computes as the int8 kernels do, exact integer
    accumulation included (see :class:`~fxcompress.quant.layers.FoldedLayer`), so
    ``lower(backend="reference")`` reproduces the folded graph bit for bit (x86: within a
    code per op).  A layer called at several sites whose inputs have different scales
    computes in float.  ``int32_bias=True`` puts each such layer's bias on its int32
    accumulator grid (``round(b / (input_scale * weight_scale)) * input_scale * weight_scale``),
    as QDQ runtimes store it (onnxruntime's QLinearConv): the folded graph then differs from
    the fake-quant graph by that rounding (at most half an accumulator step per output), and
    a model exported to onnxruntime agrees with it more closely (benchmarks/deploy.py).
    Every bias fits its int32 accumulator grid: a channel whose bias would exceed
    :data:`BIAS_CODE_LIMIT` there (a nearly dead channel: weights ~1e-6 under a bias of
    units) gets the smallest weight scale that fits it, and its weight is requantized (it
    moves by at most half that step; the folded graph then differs from the fake-quant
    graph in that channel).  Stats: ``layers`` (per bit width), ``qdq`` (modules),
    ``removed_qdq`` (redundant nodes), ``integer_exact`` (layers computing as the kernels
    do), ``weight_bytes`` before/after for the folded layers, and
    ``bias_widened_channels``.
    """

    name = "fold_fake_quant"
    requires = ("calibrate",)

    int32_bias: bool = False

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        bits: Counter[str] = Counter()
        sizes = {"before": 0, "after": 0}

        def fold(_: str, module: nn.Module) -> nn.Module | None:
            if isinstance(module, (ObservedLayer, FakeQuantLayer)):
                sizes["before"] += module.weight.numel() * module.weight.element_size()
                folded = FoldedLayer.fold(module)  # empties the float module of its weight
                sizes["after"] += folded.weight.numel() * folded.weight.element_size()
                bits[f"int{folded.spec.bits}"] += 1
                return folded
            if isinstance(module, (ActivationObserver, ActivationFakeQuant)):
                return QDQ.from_quantizer(module)
            return None

        replaced = replace_modules(gm, fold)
        qdq = replaced - sum(bits.values())
        removed = _remove_redundant(gm)
        site_scales = _input_scales(gm)
        widened = _fit_biases_in_int32(site_scales)
        exact = _record_input_scales(site_scales)
        stats = {"layers": dict(bits), "qdq": qdq, "removed_qdq": removed, "integer_exact": exact,
                 "weight_bytes": sizes, "bias_widened_channels": widened}
        if self.int32_bias:
            stats["int32_bias"] = _bias_on_accumulator_grid(gm)
        return PassResult(gm, bool(bits or qdq or removed), stats)


def _bias_on_accumulator_grid(gm: fx.GraphModule) -> int:
    """Round the bias of every folded layer with a known input scale to its int32 grid, in
    place; the number of layers rounded (a layer without one scale for all its call sites
    keeps its float bias)."""
    rounded = 0
    for layer in {id(m): m for m in gm.modules() if isinstance(m, FoldedLayer)}.values():
        bias = layer.bias
        if bias is None or layer.input_scale is None or layer.weight_scale.dim() > 1:
            continue
        step = (layer.input_scale.float() * layer.weight_scale.float()).reshape(-1)
        with torch.no_grad():
            bias.copy_((torch.round(bias.float() / step) * step).to(bias.dtype))
        rounded += 1
    return rounded


def _qdq_of(node: fx.Node, gm: fx.GraphModule) -> QDQ | None:
    if node.op != "call_module":
        return None
    module = gm.get_submodule(str(node.target))
    return module if isinstance(module, QDQ) else None


def _remove_redundant(gm: fx.GraphModule) -> int:
    """Erase each QDQ node whose input already went through an equal QDQ (quantize-dequantize
    is idempotent, and ops that preserve qparams keep values on the grid)."""
    removed = 0
    for node in list(gm.graph.nodes):
        module = _qdq_of(node, gm)
        if module is None or not isinstance(node.args[0], fx.Node):
            continue
        source = node.args[0]
        while _qdq_of(source, gm) is None and (up := preserves_qparams(source, gm)) is not None:
            source = up
        earlier = _qdq_of(source, gm)
        if earlier is not None and earlier.same_qparams(module):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            removed += 1
    if removed:
        used = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
        for path, module in list(gm.named_modules()):
            if isinstance(module, QDQ) and path not in used:
                gm.delete_submodule(path)
    return removed


def _input_scales(gm: fx.GraphModule) -> list[tuple[FoldedLayer, list[torch.Tensor | None]]]:
    """Each folded layer with the scale of the input at each of its call sites: the per-tensor
    scale of the QDQ feeding it (possibly through grid-keeping ops), None where there is none."""
    scales: dict[int, tuple[FoldedLayer, list]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        layer = gm.get_submodule(str(node.target))
        if not isinstance(layer, FoldedLayer):
            continue
        source = quant_source(node.args[0], gm)
        quantizer = gm.get_submodule(str(source.target)) if source is not None else None
        per_tensor = isinstance(quantizer, QDQ) and quantizer.scale.numel() == 1
        scales.setdefault(id(layer), (layer, []))[1].append(quantizer.scale.reshape(()) if per_tensor else None)
    return list(scales.values())


def _fit_biases_in_int32(site_scales: list[tuple[FoldedLayer, list]]) -> int:
    """Widen, in place, the weight scale of each channel whose bias on its accumulator grid
    (``bias / (input_scale * weight_scale)``, at the smallest input scale of the layer's sites)
    exceeds :data:`BIAS_CODE_LIMIT`, to the scale that brings it to the limit; the number of
    channels widened.

    Integer runtimes (onnxruntime's QLinearConv, a QDQ file's int32 bias) add the bias to the
    int32 accumulator: a clamped bias silently changes the layer, and onnxruntime's int32 sum
    wraps around.  The channels this finds are nearly dead (a BatchNorm fold that left
    weights of ~1e-6 under a bias of several units: EfficientNet-Lite0's stem has two), so
    the wider step moves their weights by less than 1e-7."""
    widened = 0
    for layer, found in site_scales:
        scales = [s for s in found if s is not None]
        bias = layer.bias
        if (bias is None or not scales or layer.weight_scale.dim() > 1 or layer.spec.axis != 0
                or layer.op not in ("linear", "conv1d", "conv2d", "conv3d")):
            continue
        input_scale = torch.stack(scales).min().float()
        needed = bias.detach().float().abs() / (input_scale * BIAS_CODE_LIMIT)
        if layer.weight_scale.dim() == 0:
            needed = needed.max()
        wider = needed > layer.weight_scale
        if bool(wider.any()):
            layer.widen_weight_scale(torch.where(wider, needed, layer.weight_scale))
            widened += int(wider.sum())
    return widened


def _record_input_scales(site_scales: list[tuple[FoldedLayer, list]]) -> int:
    """Give each folded layer whose sites all see one per-tensor scale that scale; the number
    of layers that then compute as the int8 kernels do.

    A layer called at several sites whose inputs have different scales gets none: it
    computes in float (its sites still lower to int8 kernels, each with its own qparams).
    """
    exact = 0
    for layer, found in site_scales:
        same = all(s is not None for s in found) and all(torch.equal(s, found[0]) for s in found)
        layer.set_input_scale(found[0] if same else None)
        exact += layer.integer_exact
    return exact
