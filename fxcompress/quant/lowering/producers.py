"""Ops that compute a quantize-dequantize's uint8 codes directly, with no float value in memory.

When the value ``v`` under ``QDQ(v)`` is read by nothing else, the lowering asks
:meth:`UInt8Producers.find` for an op that yields ``QDQ(v)``'s codes from ``v``'s inputs: a
uint8 add (+ ReLU) or product of two uint8-able values (:class:`QuantAdd`, :class:`QuantMul`),
a uint8 adaptive average pool (:class:`QuantAdaptiveAvgPool2d`), a squeeze-excitation
product ``x * gains`` of float values
(:class:`QuantizeProduct`), an activation of a uint8-able value as a table of its 256 output
codes (:class:`QuantTable`), or a :class:`Quantize` that applies ``v``'s activation to a float
value chunk by chunk. Each computes what the folded graph's float op and quantization compute.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import fx, nn

from fxcompress.ops import Kind, OpInfo, describe
from fxcompress.quant.kernels import POST_OPS
from fxcompress.quant.lowered import QuantAdaptiveAvgPool2d, QuantAdd, Quantize, QuantizeProduct, QuantMul, QuantTable
from fxcompress.quant.lowering.build import STATS_KIND, QParams
from fxcompress.quant.fusion import TABLE_ACTIVATIONS, post_op_of
from fxcompress.quant.lowering.state import LoweringState

__all__ = ["UInt8Producers", "impure"]


def impure(node: fx.Node) -> bool:
    """Whether a function or method call has side effects (it is then never deferred or fused away)."""
    return node.op in ("call_function", "call_method") and node.is_impure()


class UInt8Producers:
    """The producers of one lowering (see the module docstring)."""

    def __init__(self, lowering: LoweringState) -> None:
        self.low = lowering

    def add_under(self, value: fx.Node, info: OpInfo) -> tuple[OpInfo, bool] | None:
        """``(add, relu)`` when ``value`` is an add (or a ReLU of a single-use add) of two
        uint8-able values, which a uint8 add computes."""
        relu = info.kind is Kind.ACTIVATION and info.op == "relu" and isinstance(value.args[0], fx.Node) \
            and len(value.args[0].users) == 1
        add = describe(value.args[0], self.low.gm) if relu else info  # type: ignore[arg-type]
        if add.kind is Kind.ELEMENTWISE and add.op == "add" and add.params.get("alpha", 1) == 1 \
                and len(add.inputs) == 2 and all(isinstance(i, fx.Node) and self.low.has_codes(i) for i in add.inputs):
            return add, relu
        return None

    def find(self, value: fx.Node) -> Callable[[fx.Node, QParams], fx.Node] | None:
        """An op computing ``QDQ(value)``'s codes directly, when ``value`` is such an op's output
        that nothing else reads: a uint8 adaptive average pool or add (+ ReLU) of uint8-able
        values, or a :class:`Quantize` applying ``value``'s activation to its float input."""
        users = list(value.users)
        if len(users) != 1 or self.low.qdq_qparams(users[0]) is None or value.op == "placeholder" or impure(value):
            return None
        info = describe(value, self.low.gm)
        found = self.add_under(value, info)
        if found is not None:
            add, relu = found
            return lambda qdq, qp: self._add(value, add.inputs, relu, qp)
        if self._product_of_codes(info):
            return lambda qdq, qp: self._mul(value, info.inputs, qp)
        gated = self._gated(info)
        if gated is not None:
            return lambda qdq, qp: self._product_quantize(value, *gated, qp)
        post = post_op_of(info, TABLE_ACTIVATIONS) if info.kind is Kind.ACTIVATION else None
        if post is not None and info.inputs and isinstance(info.inputs[0], fx.Node):
            x = info.inputs[0]
            if self.low.has_codes(x):
                return lambda qdq, qp: self._table(value, x, post, qp)
            if post[0] in POST_OPS:
                return lambda qdq, qp: self._activation_quantize(value, x, post, qp)
        pooled = info.kind is Kind.POOL and info.op == "adaptive_avg_pool2d"
        size = info.params.get("output_size")
        if pooled and info.inputs and isinstance(info.inputs[0], fx.Node) and self.low.has_codes(info.inputs[0]) \
                and size is not None and None not in (size if isinstance(size, (tuple, list)) else (size,)):
            return lambda qdq, qp: self._avg_pool(value, info.inputs[0], size, qp)
        return None

    def _add(self, value: fx.Node, inputs: tuple, relu: bool, qp: QParams) -> fx.Node:
        (ua, qa), (ub, qb) = self.low.uint8(inputs[0]), self.low.uint8(inputs[1])  # type: ignore[misc]
        module = QuantAdd.from_qparams((qa.scale, qa.zero_point), (qb.scale, qb.zero_point),
                                       (qp.scale, qp.zero_point), relu=relu, backend=self.low.backend)
        self.low.stats.int8_ops[STATS_KIND[QuantAdd]] += 1
        self.low.stats.lowered[value.name] = (module, (self.low.shape(inputs[0]), self.low.shape(inputs[1])))
        return self.low.call(value, module, (ua, ub))

    def _product_of_codes(self, info: OpInfo) -> bool:
        """Whether ``info`` multiplies two uint8-able values (a gate built for onnxruntime)."""
        return (info.kind is Kind.ELEMENTWISE and info.op == "mul" and len(info.inputs) == 2
                and all(isinstance(i, fx.Node) and self.low.has_codes(i) for i in info.inputs))

    def _mul(self, value: fx.Node, inputs: tuple, qp: QParams) -> fx.Node:
        (ua, qa), (ub, qb) = self.low.uint8(inputs[0]), self.low.uint8(inputs[1])  # type: ignore[misc]
        module = QuantMul.from_qparams((qa.scale, qa.zero_point), (qb.scale, qb.zero_point), (qp.scale, qp.zero_point),
                                       backend=self.low.backend)
        self.low.stats.int8_ops[STATS_KIND[QuantMul]] += 1
        self.low.stats.lowered[value.name] = (module, (self.low.shape(inputs[0]), self.low.shape(inputs[1])))
        return self.low.call(value, module, (ua, ub))

    def _gated(self, info: OpInfo) -> tuple[fx.Node, fx.Node] | None:
        """``(x, gains)`` when ``info`` multiplies a float ``(N, C, H, W)`` value by ``(N, C, 1, 1)``
        gains (squeeze-excitation), which :class:`QuantizeProduct` quantizes in one pass."""
        if info.kind is not Kind.ELEMENTWISE or info.op != "mul" or len(info.inputs) != 2 \
                or not all(isinstance(i, fx.Node) for i in info.inputs):
            return None
        a, b = info.inputs
        sa, sb = self.low.shape(a), self.low.shape(b)
        for x, gains, sx, sg in ((a, b, sa, sb), (b, a, sb, sa)):
            if len(sx) == 4 and tuple(sg) == (sx[0], sx[1], 1, 1) and not self.low.has_codes(x):
                return x, gains
        return None

    def _product_quantize(self, value: fx.Node, x: fx.Node, gains: fx.Node, qp: QParams) -> fx.Node:
        module = QuantizeProduct.from_qparams(qp.scale, qp.zero_point, backend=self.low.backend)
        return self.low.call(value, module, (self.low.float(x), self.low.float(gains)), name=f"quantize_{value.name}")

    def _activation_quantize(self, value: fx.Node, x: fx.Node, post: tuple[str, tuple[float, ...]],
                             qp: QParams) -> fx.Node:
        """``QDQ(act(x))`` for a float ``x``: one Quantize applying the activation (torch's op)
        chunk by chunk, the pass over memory an activation of its own would cost saved."""
        module = Quantize.from_qparams(qp.scale, qp.zero_point, activation=post[0], activation_args=post[1],
                                       backend=self.low.backend)
        return self.low.call(value, module, (self.low.float(x),), name=f"quantize_{value.name}")

    def _table(self, value: fx.Node, x: fx.Node, post: tuple[str, tuple[float, ...]], qp: QParams) -> fx.Node:
        """``QDQ(act(x))`` for a uint8-able ``x``: the activation's 256 output codes, looked up."""
        u, qx = self.low.uint8(x)  # type: ignore[misc]
        module = QuantTable.from_activation(post[0], post[1], (qx.scale, qx.zero_point), (qp.scale, qp.zero_point),
                                            backend=self.low.backend)
        self.low.stats.int8_ops[STATS_KIND[QuantTable]] += 1
        self.low.stats.lowered[value.name] = (module, (self.low.shape(x),))
        return self.low.call(value, module, (u,))

    def _avg_pool(self, value: fx.Node, x: fx.Node, size: Any, qp: QParams) -> fx.Node:
        u, qx = self.low.uint8(x)  # type: ignore[misc]
        module = QuantAdaptiveAvgPool2d.from_float(nn.AdaptiveAvgPool2d(size), qx.scale, qx.zero_point,
                                                   qp.scale, qp.zero_point, backend=self.low.backend)
        self.low.stats.int8_ops[STATS_KIND[QuantAdaptiveAvgPool2d]] += 1
        self.low.stats.lowered[value.name] = (module, (self.low.shape(x),))
        return self.low.call(value, module, (u,))
