"""Static int8 lowering: a folded graph becomes a graph of lowered modules.

The folded graph computes every quantized value as ``QDQ(v)`` (a quantize-dequantize
in float) and every quantized layer with its dequantized integer weight. The lowered
graph is built node by node in a new ``fx.Graph``; each folded value may get two forms:

* a **uint8 form** (:meth:`StaticLowering.uint8`): the integer codes, channels-last,
  with per-tensor qparams. ``QDQ(v)`` has one: emitted by the int8 kernel computing
  ``v`` (requantized inside it), or by a uint8 add / average pool, or else a
  :class:`Quantize` (which also applies ``v``'s activation when ``v = act(x)``) or a
  :class:`QuantizeProduct` (``v = x * gains``, a squeeze-excitation gate), so that
  neither float result is written out. Max pooling, reshapes, permutes, no-ops and concatenations of
  uint8 forms with equal qparams have one too, computed on the codes.
* a **float form** (:meth:`StaticLowering.float`): for the ops that stay float; for a
  ``QDQ`` it is a :class:`Dequantize` of its uint8 form (the same values).

Both are made on demand, so a value that only int8 ops read never goes through float,
and a ``Dequantize`` appears exactly where a float op reads a quantized value. Nodes
that are only ever needed in one form are only computed in that form.

Lowered activations are channels-last (what the kernels want), so ``x.view(...)`` calls
become ``x.reshape(...)`` (a view wherever one exists, a copy where channels-last needs it).

Each quantized conv/linear becomes a lowered conv/:class:`QuantLinear` with its fused chain
(:mod:`fxcompress.quant.fusion`), emitted by :mod:`.emit_layer` in the way :mod:`.choice` picks; one the
kernels cannot take keeps its :class:`FoldedLayer` (integer storage, dequantize + float
compute), with the reason recorded. The ops that compute a quantization's codes straight
from their inputs are :mod:`.producers`.
"""

from __future__ import annotations

from typing import Callable

import torch.nn.functional as F
from torch import fx, nn

from fxcompress.ops import Kind, describe, tensor_shape
from fxcompress.pass_base import PassContext
from fxcompress.quant.activations import QDQ, grid_padding, preserves_qparams
from fxcompress.quant.layers import FoldedLayer
from fxcompress.quant.lowered import (
    Dequantize, QuantAdaptiveAvgPool2d, QuantAdd, QuantConvNd, QuantMaxPool2d, Quantize,
    QuantizeProduct, QuantMul, QuantTable,
)
from fxcompress.quant.lowering.build import STATS_KIND, QParams, layer_problem, uint8_qparams
from fxcompress.quant.fusion import FusedChain, match_chain
from fxcompress.quant.lowering.emit_layer import LayerEmitter
from fxcompress.quant.lowering.producers import UInt8Producers, impure
from fxcompress.quant.lowering.state import Choose, LoweringStats

__all__ = ["LOWERED_CONTAINER", "StaticLowering"]

#: The submodule holding the lowered modules that have no folded module to replace.
LOWERED_CONTAINER = "fxc_lowered"
# Modules whose output is a fresh tensor: a fused residual add may write into it.
_FRESH = (Quantize, QuantizeProduct, Dequantize, QuantConvNd, QuantAdd, QuantMaxPool2d, QuantAdaptiveAvgPool2d,
          QuantTable, QuantMul)

class StaticLowering:
    """One lowering of ``gm`` (see the module docstring); :meth:`run` rewrites it in place."""

    def __init__(self, gm: fx.GraphModule, ctx: PassContext, backend: str, choose: Choose | None = None, *,
                 approximate_post_ops: bool = True) -> None:
        self.gm, self.ctx, self.backend, self.choose = gm, ctx, backend, choose
        self.approximate_post_ops = approximate_post_ops
        self.old = gm.graph
        self.new = fx.Graph(owning_module=gm)
        self.new.set_codegen(self.old._codegen)  # an exported graph's pytree calling convention
        self.floats: dict[fx.Node, fx.Node] = {}
        self.codes: dict[fx.Node, tuple[fx.Node, QParams]] = {}
        self.chains: dict[fx.Node, FusedChain] = {}  # op node -> its chain, for the ops lowered
        # op node -> its folded layer, read before any is replaced: a layer called at several
        # sites (or reached under several names) is lowered once per call site.
        self.layers: dict[fx.Node, FoldedLayer] = {}
        self.ends: dict[fx.Node, fx.Node] = {}  # chain end -> op node: where the op is emitted
        self.targets: set[str] = set()  # folded-layer paths already holding a lowered module
        self.inside: set[fx.Node] = set()  # chain nodes the lowered ops absorb
        self.deferred: set[fx.Node] = set()  # pure nodes computed only when a form is asked for
        self.on_demand: list[fx.Node] = []  # new nodes made when a form was asked for (all pure)
        existing = getattr(gm, LOWERED_CONTAINER, None)  # an earlier lowering's (lower runs twice)
        self.container = existing if isinstance(existing, nn.ModuleDict) else nn.ModuleDict()
        self.stats = LoweringStats()
        self._capable: dict[fx.Node, QParams | None] = {}
        self.producers = UInt8Producers(self)
        self.emitter = LayerEmitter(self)

    # -- planning ---------------------------------------------------------------
    def _module(self, node: fx.Node) -> nn.Module | None:
        return self.gm.get_submodule(str(node.target)) if node.op == "call_module" else None

    def qdq_qparams(self, node: fx.Node) -> QParams | None:
        """The uint8 qparams of a QDQ node the kernels reproduce, else None."""
        module = self._module(node)
        return uint8_qparams(module) if isinstance(module, QDQ) else None

    def has_codes(self, node: fx.Node) -> bool:
        """Whether ``node``'s value can have a uint8 form without a float round trip."""
        return self.code_qparams(node) is not None

    def code_qparams(self, node: fx.Node) -> QParams | None:
        """The qparams of ``node``'s uint8 form, or None when it cannot have one (memoised)."""
        if node not in self._capable:
            self._capable[node] = self._find_qparams(node)
        return self._capable[node]

    def _find_qparams(self, node: fx.Node) -> QParams | None:
        found = self.qdq_qparams(node)
        if found is not None or node.op not in ("call_module", "call_function", "call_method"):
            return found
        info = describe(node, self.gm)
        if info.kind is Kind.CONCAT and info.op == "cat":
            inputs = [self.code_qparams(i) if isinstance(i, fx.Node) else None for i in info.inputs]
            return inputs[0] if inputs and None not in inputs and len(set(inputs)) == 1 else None
        # An op whose output holds values of its input carries the input's codes, computed on
        # the codes; of the max pools only the 2-D one has a uint8 kernel here.
        first = preserves_qparams(node, self.gm)
        if first is None:
            return None
        if info.kind is Kind.POOL and not grid_padding(info) \
                and not (info.op == "max_pool2d" and len(self.shape(first)) == 4):
            return None
        return self.code_qparams(first)

    @staticmethod
    def shape(node: fx.Node) -> tuple[int, ...]:
        return tensor_shape(node) or ()

    def plan(self) -> None:
        """Decide which folded layers lower, with which chains; which nodes wait to be asked for."""
        for node in self.old.nodes:
            module = self._module(node)
            if isinstance(module, FoldedLayer):
                self._plan_layer(node, module)
        for node in self.old.nodes:
            if node in self.inside or node in self.chains:
                continue
            info = describe(node, self.gm) if node.op in ("call_module", "call_function", "call_method") else None
            if info is None or node.op == "output":
                continue
            if self.has_codes(node) and not impure(node):
                self.deferred.add(node)
            elif info.kind is Kind.SHAPE and node.args and isinstance(node.args[0], fx.Node) \
                    and self.has_codes(node.args[0]):
                self.deferred.add(node)  # x.size() of a uint8-able value: asked of whichever form exists
            elif self.producers.find(node) is not None:
                self.deferred.add(node)
                if self.producers.add_under(node, info) is not None and info.kind is Kind.ACTIVATION:
                    self.deferred.add(node.args[0])  # type: ignore[arg-type]  # relu(add): the add goes with it

    def _plan_layer(self, node: fx.Node, layer: FoldedLayer) -> None:
        info = describe(node, self.gm)
        data = info.inputs[0] if info.inputs and isinstance(info.inputs[0], fx.Node) else None
        reason = None
        if not self.ctx.in_scope(node):
            reason = "out of scope (scope/skip)"
        elif (problem := layer_problem(layer)) is not None:
            reason = problem
        elif data is None or not self.has_codes(data):
            reason = "its input is not quantized to uint8 in the folded graph (activations float there)"
        if reason is not None:
            self.stats.float_nodes[node.name] = f"kept folded (dequantize + float compute): {reason}"
            return
        chain = match_chain(info, self.gm, through_noops=True, approximate=self.approximate_post_ops)
        if chain.residual is not None and (self.out_qparams(chain) is not None
                                          and not self.has_codes(chain.residual)
                                          or any(n in self.inside for n in chain.nodes)):
            chain = match_chain(info, self.gm, through_noops=True, allow_add=False,
                                approximate=self.approximate_post_ops)
        self.chains[node] = chain
        self.layers[node] = layer
        self.ends[chain.end] = node
        self.inside.update(chain.nodes[1:])

    def out_qparams(self, chain: FusedChain) -> QParams | None:
        """The uint8 qparams the op emits: those of the QDQ that is the chain end's only user."""
        users = list(chain.end.users)
        return self.qdq_qparams(users[0]) if len(users) == 1 else None

    # -- forms ------------------------------------------------------------------
    def copy_node(self, node: fx.Node, arg: Callable[[fx.Node], fx.Node]) -> fx.Node:
        new = self.new.node_copy(node, arg)
        if node.op == "call_method" and describe(node, self.gm).op == "view":
            # Lowered activations are channels-last, where view() of split channels fails;
            # reshape() gives the same values (a view whenever one is possible).
            new.target = "reshape"
        new.meta = {k: v for k, v in node.meta.items() if k not in ("tensor_meta", "type")}
        return new

    def call(self, like: fx.Node, module: nn.Module, args: tuple, *, target: str | None = None,
              name: str | None = None) -> fx.Node:
        """A call of ``module`` (at ``target``, else in the lowered container) named ``name``
        (default: like ``like``, whose metadata it takes)."""
        name = name or like.name
        if target is not None and target not in self.targets:
            self.targets.add(target)
            self.gm.set_submodule(target, module)
        else:
            key = name
            while key in self.container:
                key += "_"
            self.container[key] = module
            target = f"{LOWERED_CONTAINER}.{key}"
        new = self.new.create_node("call_module", target, args, {}, name=name)
        new.meta = {k: v for k, v in like.meta.items() if k not in ("tensor_meta", "type")}
        return new

    def float(self, node: fx.Node) -> fx.Node:
        """The new-graph node holding ``node``'s float value (made now if needed)."""
        found = self.floats.get(node)
        if found is not None:
            return found
        if self.qdq_qparams(node) is not None:
            u, qp = self.uint8(node)  # type: ignore[misc]
            made = self.call(node, Dequantize.from_qparams(qp.scale, qp.zero_point, backend=self.backend), (u,),
                              name=f"dequantize_{node.args[0].name}")  # type: ignore[union-attr]
        elif node in self.deferred and describe(node, self.gm).kind is Kind.SHAPE:
            made = self.copy_node(node, self._any_form)
        else:
            made = self.copy_node(node, self.float)
        if node in self.deferred or self.qdq_qparams(node) is not None:
            self.on_demand.append(made)
        self.floats[node] = made
        return made

    def _any_form(self, node: fx.Node) -> fx.Node:
        """A form of ``node`` for shape queries: whichever exists, codes preferred."""
        if node in self.floats:
            return self.floats[node]
        if self.has_codes(node):
            return self.uint8(node)[0]  # type: ignore[index]
        return self.float(node)

    def uint8(self, node: fx.Node) -> tuple[fx.Node, QParams] | None:
        """The new-graph node holding ``node``'s uint8 codes and their qparams (made now if needed)."""
        found = self.codes.get(node)
        if found is not None or not self.has_codes(node):
            return found
        qp = self.qdq_qparams(node)
        if qp is not None:
            made = self._quant_of(node, qp)
        else:
            made = self._code_op(node)
        self.on_demand.append(made[0])
        self.codes[node] = made
        return made

    def _quant_of(self, qdq: fx.Node, qp: QParams) -> tuple[fx.Node, QParams]:
        """Codes of ``QDQ(v)``: a uint8 add / average pool of codes, or a Quantize of float ``v``."""
        value = qdq.args[0]
        assert isinstance(value, fx.Node)
        producer = self.producers.find(value)
        if producer is not None:
            return producer(qdq, qp), qp
        guard = str(value.target) if value.op == "placeholder" else ""  # inputs are checked for NaN/Inf
        made = self.call(qdq, Quantize.from_qparams(qp.scale, qp.zero_point, guard=guard, backend=self.backend),
                         (self.float(value),), name=f"quantize_{value.name}")
        return made, qp

    def _code_op(self, node: fx.Node) -> tuple[fx.Node, QParams]:
        """A max pool, reshape, permute, no-op or cat computed on uint8 codes."""
        info = describe(node, self.gm)
        if info.kind is Kind.CONCAT:
            qp = self.code_qparams(node)
            assert qp is not None
            return self.copy_node(node, lambda a: self.uint8(a)[0] if a in info.inputs else self.float(a)), qp
        first = info.inputs[0]
        u, qp = self.uint8(first)  # type: ignore[misc]
        if info.kind is Kind.IDENTITY:
            return u, qp
        if info.kind is Kind.POOL and info.op == "pad":
            mode, pad = info.params.get("mode", "constant"), list(info.params["pad"])
            args = (u, pad, mode, qp.zero_point) if mode == "constant" else (u, pad, mode)
            new = self.new.create_node("call_function", F.pad, args, {}, name=node.name)
            new.meta = {k: v for k, v in node.meta.items() if k not in ("tensor_meta", "type")}
            return new, qp
        if info.kind is Kind.POOL:
            p = info.params
            pool = QuantMaxPool2d(p["kernel_size"], p.get("stride") or None, p.get("padding", 0),
                                  p.get("dilation", 1), bool(p.get("ceil_mode", False)), backend=self.backend)
            self.stats.int8_ops[STATS_KIND[QuantMaxPool2d]] += 1
            self.stats.lowered[node.name] = (pool, ())
            return self.call(node, pool, (u,)), qp
        return self.copy_node(node, lambda a: u if a is first else self._any_form(a)), qp

    # -- emission -----------------------------------------------------------------
    def run(self) -> LoweringStats:
        """Plan, build the new graph, install it in ``gm``; returns the stats."""
        self.plan()
        self.gm.add_submodule(LOWERED_CONTAINER, self.container)
        for node in self.old.nodes:
            # A lowered op is emitted where its chain ends: its residual may be computed
            # after the op itself (a ResNet downsample branch).
            if node in self.ends:
                op = self.ends[node]
                self.emitter.emit(op, self.chains[op])
            elif node.op == "output":
                self.copy_node(node, self.float)
            elif node not in self.chains and node not in self.inside and node not in self.deferred:
                self.floats[node] = self.copy_node(node, self.float)
        self._drop_unused()
        self._consume_residuals()
        self.gm.graph = self.new
        self.gm.delete_all_unused_submodules()
        return self.stats

    def _drop_unused(self) -> None:
        """Erase forms made for a consumer that then took another path (a layer kept float),
        and count what remains."""
        for node in reversed(list(dict.fromkeys(self.on_demand))):
            if not node.users:
                self.new.erase_node(node)
        called = {id(self.gm.get_submodule(str(n.target))) for n in self.new.nodes if n.op == "call_module"}
        for name, (module, _) in list(self.stats.lowered.items()):
            if id(module) not in called:  # only uint8 pools and adds are made on demand
                del self.stats.lowered[name]
                self.stats.int8_ops[STATS_KIND[type(module)]] -= 1
        self.stats.int8_ops = +self.stats.int8_ops  # drops kinds counted down to 0
        for cls, key in (((Quantize, QuantizeProduct), "quantize"), (Dequantize, "dequantize")):
            self.stats.boundaries[key] = sum(isinstance(self.container[k], cls) and id(self.container[k]) in called
                                             for k in self.container)

    def _consume_residuals(self) -> None:
        """Let a fused residual add write into its residual where nothing reads it afterwards."""
        order = {n: i for i, n in enumerate(self.new.nodes)}
        for node in self.new.nodes:
            module = self.gm.get_submodule(str(node.target)) if node.op == "call_module" else None
            if not (isinstance(module, QuantConvNd) and module.residual and len(node.args) == 2):
                continue
            victim = node.args[1]
            assert isinstance(victim, fx.Node)
            producer = self.gm.get_submodule(str(victim.target)) if victim.op == "call_module" else None
            last = all(order[u] <= order[node] for u in victim.users)
            if isinstance(producer, _FRESH) and last:
                module.consume_residual = True
