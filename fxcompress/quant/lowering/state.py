"""What the parts of one static lowering share: :class:`LoweringState`, the lowering as the
layer emitter (:mod:`.emit_layer`) and the uint8 producers (:mod:`.producers`) see it, with
:class:`LoweringStats` and :data:`Choose`.

:class:`~fxcompress.quant.lowering.static.StaticLowering` is the one implementation; its
parts depend on this description of it, not on it, so the imports run one way
(``static -> emit_layer, producers -> state``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Protocol

from torch import fx, nn

from fxcompress.pass_base import PassContext
from fxcompress.quant.layers import FoldedLayer
from fxcompress.quant.lowered import LoweredModule
from fxcompress.quant.lowering.build import QParams
from fxcompress.quant.fusion import FusedChain
from fxcompress.quant.lowering.choice import Candidates, Choice

__all__ = ["LoweringState", "LoweringStats", "Choose"]

#: ``choose(candidates) -> Choice``: how a quantized layer runs (``choice.choose`` times them).
Choose = Callable[[Candidates], Choice]


@dataclass
class LoweringStats:
    """What the lowering did, for the pass's stats."""

    int8_ops: Counter = field(default_factory=Counter)  # kind -> count
    float_nodes: dict[str, str] = field(default_factory=dict)  # quantized-layer node -> why not int8
    # node -> (module, the arguments of its kernel_support(): input shapes where they matter)
    lowered: dict[str, tuple[LoweredModule, tuple]] = field(default_factory=dict)
    boundaries: Counter = field(default_factory=Counter)  # "quantize" / "dequantize" -> count
    choices: Counter = field(default_factory=Counter)  # way ("int8", "separate add", "float") -> layers


class LoweringState(Protocol):
    """The lowering in progress, as its parts read and extend it (see
    :mod:`fxcompress.quant.lowering.static` for what each form means)."""

    gm: fx.GraphModule
    ctx: PassContext
    backend: str
    choose: Choose | None
    stats: LoweringStats
    layers: dict[fx.Node, FoldedLayer]  # op node -> its folded layer
    floats: dict[fx.Node, fx.Node]  # folded node -> its float form in the new graph
    codes: dict[fx.Node, tuple[fx.Node, QParams]]  # folded node -> its uint8 form and qparams
    on_demand: list[fx.Node]  # new nodes made when a form was asked for

    def has_codes(self, node: fx.Node) -> bool: ...
    def code_qparams(self, node: fx.Node) -> QParams | None: ...
    def qdq_qparams(self, node: fx.Node) -> QParams | None: ...
    def out_qparams(self, chain: FusedChain) -> QParams | None: ...
    def shape(self, node: fx.Node) -> tuple[int, ...]: ...
    def float(self, node: fx.Node) -> fx.Node: ...
    def uint8(self, node: fx.Node) -> tuple[fx.Node, QParams] | None: ...
    def copy_node(self, node: fx.Node, arg: Callable[[fx.Node], fx.Node]) -> fx.Node: ...
    def call(self, like: fx.Node, module: nn.Module, args: tuple, *, target: str | None = None,
             name: str | None = None) -> fx.Node: ...
