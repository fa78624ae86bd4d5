"""One channel rule per op kind (through :func:`fxcompress.ops.describe`).

:class:`Analyzer` walks the graph once, in order, and gives every tensor node
its :class:`~fxcompress.prune.types.Space`.  The rules live with their family
and are dispatched from one table here, by :class:`~fxcompress.ops.Kind`:

* :mod:`~fxcompress.prune.weighted_rules`: conv, linear, embedding, norms, PReLU;
* :mod:`~fxcompress.prune.flow_rules`: softmax, pools, concat, elementwise ops;
* :mod:`~fxcompress.prune.labels`: ops that only rearrange elements (reshape,
  permute, getitem, split, ...) and reductions, run for real on a *label
  tensor* that holds each element's atom, so channel indices are mapped through
  offsets, flattening, shuffles and head splits by torch itself;
* :mod:`~fxcompress.prune.heads`: attention, whose heads are units (attention modules);
  :mod:`~fxcompress.prune.sdpa`: ``scaled_dot_product_attention`` in decomposed attention.

The state they share is :class:`~fxcompress.prune.state.AnalysisState`.  Every
op without a rule freezes the channels it touches, with the op and node named in
the reason: never guess.
"""

from __future__ import annotations

from typing import Callable

from torch import fx

from ..ops import Kind, OpInfo, describe
from .flow_rules import FlowRules
from .heads import AttentionRule
from .labels import LabelOps
from .sdpa import SdpaRule
from .state import AnalysisState
from .weighted_rules import WeightedRules

__all__ = ["Analyzer"]


class Analyzer(AnalysisState, WeightedRules, FlowRules, LabelOps, AttentionRule, SdpaRule):
    """The channel analysis of one graph: the state plus every rule family."""

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            self.visit(node)

    def visit(self, node: fx.Node) -> None:
        meta = node.meta.get("tensor_meta")
        if node.op == "output":
            self.freeze_all(node.args, "model output (output shapes never change)")
            return
        if meta is None:  # a non-tensor value (sizes, flags): evaluate it for the shape ops that use it
            try:
                self.values[node] = self._size_value(node) if node.op not in ("placeholder", "get_attr") else None
            except Exception:  # a value we cannot compute: shape ops that need it freeze instead
                self.values[node] = None
            return
        if node.op in ("placeholder", "get_attr"):
            self.spaces[node] = self.empty_like(meta)
            return
        info = describe(node, self.gm)
        self._check_counted_sizes(info)
        rule = _RULES.get(info.kind)
        if rule is None and info.op == "select.int":  # export's aten.select (x[i]): no torch function spells it
            rule = Analyzer.select
        if rule is None:
            self.unknown(info, f"{info.op} at node {node.name}: channel semantics unknown")
        else:
            rule(self, info)


_RULES: dict[Kind, Callable[[Analyzer, OpInfo], None]] = {
    Kind.CONV: Analyzer.conv,
    Kind.LINEAR: Analyzer.linear,
    Kind.EMBEDDING: Analyzer.embedding,
    Kind.NORM: Analyzer.norm,
    Kind.ACTIVATION: Analyzer.activation,
    Kind.SOFTMAX: Analyzer.softmax,
    Kind.POOL: Analyzer.pool,
    Kind.REDUCTION: Analyzer.reduction,
    Kind.GETITEM: Analyzer.getitem,
    Kind.SPLIT: Analyzer.split,
    Kind.CONCAT: Analyzer.concat,
    Kind.ELEMENTWISE: Analyzer.elementwise,
    Kind.ATTENTION: Analyzer.attention,
    Kind.IDENTITY: Analyzer.pass_through,
    Kind.RESHAPE: Analyzer.label_op,
    Kind.PERMUTE: Analyzer.label_op,
}
