"""Structured channel pruning: dependency analysis, importance, selection, slicing.

The ``prune_channels`` pass (``passes/prune_channels.py``) is the thin rewrite
that strings these together; see docs/pruning.md for the concepts.

* :func:`build_channel_graph` — channel spaces, units, groups, frozen reasons;
* :func:`unit_scores` / :func:`taylor_terms` / :func:`activation_terms` — importance per unit;
* :func:`select` — which units go (uniform, per layer, global, ``round_to``);
* :func:`apply_removal` — physical slicing and module replacement;
* :func:`silence` — zero the consumers of units (the exactness check);
* :class:`PrunedMultiheadAttention` — what an attention layer becomes once
  its heads or widths are pruned.
"""

from .attention import PrunedMultiheadAttention
from .groups import build_channel_graph
from .importance import CRITERIA, DATA_FREE_CRITERIA, Criterion, activation_terms, taylor_terms, unit_scores
from .selection import select, unused_patterns
from .slicing import apply_removal, silence
from .types import ChannelGraph, Group, ParamSlice, Space

__all__ = [
    "ChannelGraph", "Group", "ParamSlice", "Space", "build_channel_graph",
    "CRITERIA", "DATA_FREE_CRITERIA", "Criterion", "activation_terms", "taylor_terms", "unit_scores",
    "select", "unused_patterns",
    "apply_removal", "silence",
    "PrunedMultiheadAttention",
]
