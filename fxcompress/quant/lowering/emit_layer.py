"""Emitting one quantized layer: its fused chain as an int8 module, the int8 conv with the add in
float, or the float layer, as :mod:`.choice` decides (int8 when nothing is timed).

A layer called at several sites is lowered once per site, each module with its own
activation qparams and all holding the first site's weight tensors; a zero pad that only the
conv reads is absorbed into the conv (:meth:`LayerEmitter._absorbed_pad`).
"""

from __future__ import annotations

import torch
from torch import fx, nn

from fxcompress.ops import describe
from fxcompress.quant.activations import grid_padding
from fxcompress.quant.layers import FoldedLayer
from fxcompress.quant.lowered import LoweredModule
from fxcompress.quant.lowering.build import QParams, float_twin, kept_float, quant_conv, quant_linear
from fxcompress.quant.fusion import FusedChain
from fxcompress.quant.lowering.choice import Candidates
from fxcompress.quant.lowering.state import LoweringState

__all__ = ["LayerEmitter"]


class LayerEmitter:
    """Emits the quantized layers of one lowering (see the module docstring)."""

    def __init__(self, lowering: LoweringState) -> None:
        self.low = lowering
        self.first_site: dict[int, nn.Module] = {}  # id(folded layer) -> its first call site's lowered module
        self.twins: dict[int, nn.Module] = {}  # id(folded layer) -> its float module, where kept float

    def _absorbed_pad(self, data: fx.Node, layer: FoldedLayer) -> tuple[fx.Node, tuple[int, ...]] | None:
        """``(its input, pad)`` when ``data`` is a zero pad that only this conv reads, which the
        lowered conv applies to its codes itself (TensorFlow-style "same" padding: one pass over
        memory saved)."""
        if data.op not in ("call_module", "call_function") or len(data.users) != 1 or \
                layer.op == "linear" or layer.module.padding_mode != "zeros":
            return None
        info = describe(data, self.low.gm)
        source = info.inputs[0] if info.inputs else None
        if not (grid_padding(info) and info.params.get("mode", "constant") == "constant") or \
                not isinstance(source, fx.Node) or not self.low.has_codes(source):
            return None
        pad = tuple(int(v) for v in info.params["pad"])
        return (source, pad) if len(pad) == 2 * (len(layer.weight_shape) - 2) else None

    def _conv(self, layer: FoldedLayer, qx: QParams, out: QParams | None, pad: tuple[int, ...], *,
              post_op: str = "none", post_op_args: tuple[float, ...] = (),
              residual: QParams | bool = False) -> LoweredModule:
        """The lowered conv of ``layer``, applying an absorbed zero ``pad`` to its codes."""
        module = quant_conv(layer, qx, out, post_op=post_op, post_op_args=post_op_args, residual=residual,
                            backend=self.low.backend)
        if pad:
            module.add_pre_padding(pad)
        return module

    def emit(self, node: fx.Node, chain: FusedChain) -> None:
        layer = self.low.layers[node]
        data = describe(node, self.low.gm).inputs[0]
        absorbed = self._absorbed_pad(data, layer)  # type: ignore[arg-type]
        data, pad = absorbed if absorbed is not None else (data, ())
        u, qx = self.low.uint8(data)  # type: ignore[misc]
        out = self.low.out_qparams(chain)
        conv = layer.op != "linear"  # layer_problem admitted only convs and linears
        args: tuple = (u,)
        if conv:
            residual: QParams | bool = False
            if chain.residual is not None:
                if out is not None:
                    r, residual = self.low.uint8(chain.residual)  # type: ignore[misc]
                else:
                    r, residual = self.low.float(chain.residual), True
                args = (u, r)
            module = self._conv(layer, qx, out, pad, post_op=chain.post_op, post_op_args=chain.post_op_args,
                                residual=residual)
        else:
            module = quant_linear(layer, qx, out, post_op=chain.post_op, post_op_args=chain.post_op_args,
                                  backend=self.low.backend)
        way = "int8"
        module = self._shared(layer, module)
        if self.low.choose is not None:
            choice = self.low.choose(self._candidates(node, data, pad, chain, layer, module, qx, out))
            way = choice.way
            self.low.stats.choices[way] += 1
            if way == "float":
                self.low.stats.float_nodes[node.name] = f"kept float: {choice.reason}"
        if way == "float":
            self._emit_float_chain(node, chain, layer)
        elif way == "separate add":
            self._emit_separate_add(node, chain, layer, u, qx, pad)
        else:
            new = self.low.call(node, module, args, target=str(node.target))
            self._count_int8(node, module, data, conv)
            if out is not None:
                self.low.codes[next(iter(chain.end.users))] = (new, out)
            else:
                self.low.floats[chain.end] = new

    def _shared(self, layer: FoldedLayer, module: nn.Module) -> nn.Module:
        """``module`` holding the same weight tensors as the module of ``layer``'s first call
        site: a layer called at several sites is lowered once per site (each with its own
        activation qparams) and stored once."""
        first = self.first_site.setdefault(id(layer), module)
        if first is not module and type(first) is type(module):
            for name in ("weight", "weight_scale", "bias"):
                mine, theirs = getattr(module, name, None), getattr(first, name, None)
                if isinstance(mine, torch.Tensor) and isinstance(theirs, torch.Tensor) and torch.equal(mine, theirs):
                    setattr(module, name, theirs)
        return module

    def _count_int8(self, node: fx.Node, module: LoweredModule, data: fx.Node, conv: bool) -> None:
        self.low.stats.int8_ops["conv" if conv else "linear"] += 1
        self.low.stats.lowered[node.name] = (module, (self.low.shape(data),) if conv else ())

    def _candidates(self, node: fx.Node, data: fx.Node, pad: tuple[int, ...], chain: FusedChain,
                    layer: FoldedLayer, module: LoweredModule, qx: QParams, out: QParams | None) -> Candidates:
        """The ways to run this layer, for :mod:`.choice` to time (``data``: the int8 input,
        ``pad``: a zero pad absorbed in front of the conv, which the float way applies itself)."""
        separate = None
        residual_kind, residual_qparams = None, None
        if chain.residual is not None:
            residual_kind = "uint8" if out is not None else "float"
            found = self.low.code_qparams(chain.residual) if out is not None else None
            residual_qparams = (found.scale, found.zero_point) if found is not None else None
            separate = self._conv(layer, qx, None, pad)
        return Candidates(
            int8=module, float_module=float_twin(layer), separate=separate,  # type: ignore[arg-type]
            input_shape=self.low.shape(data), output_shape=self.low.shape(node), input_padding=pad,
            input_qparams=(qx.scale, qx.zero_point),
            output_qparams=None if out is None else (out.scale, out.zero_point),
            residual=residual_kind, residual_qparams=residual_qparams,
            post_op=chain.post_op, post_op_args=chain.post_op_args)

    def _emit_float_chain(self, node: fx.Node, chain: FusedChain, layer: FoldedLayer) -> None:
        """The chain computed in float, its layer computing with the dequantized weight (a conv's
        stored as the int8 codes: :func:`~fxcompress.quant.lowering.build.kept_float`)."""
        twin = self.twins.get(id(layer))
        if twin is None:  # one float module serves every call site kept float
            twin = self.twins[id(layer)] = kept_float(layer, self.low.backend)
        self.low.floats[node] = self.low.call(node, twin, (self.low.float(node.args[0]),), target=str(node.target))
        self._copy_chain_rest(chain)

    def _emit_separate_add(self, node: fx.Node, chain: FusedChain, layer: FoldedLayer, u: fx.Node,
                           qx: QParams, pad: tuple[int, ...]) -> None:
        """The int8 conv with a float32 output; its residual add and activation as float ops
        (the same values as the fused ``sum``: see :mod:`.choice`)."""
        conv = self._shared(layer, self._conv(layer, qx, None, pad))
        self.low.floats[node] = self.low.call(node, conv, (u,), target=str(node.target))
        self._count_int8(node, conv, node.args[0], True)  # type: ignore[arg-type]
        self._copy_chain_rest(chain)

    def _copy_chain_rest(self, chain: FusedChain) -> None:
        """The chain's nodes after its op as float ops; those a quantization absorbs instead
        (a ReLU applied by the Quantize that follows) are dropped when unused."""
        for n in chain.nodes[1:]:
            self.low.floats[n] = self.low.copy_node(n, self.low.float)
            self.low.on_demand.append(self.low.floats[n])
