"""Compressing to a budget: what each change costs, and the resources a budget counts.

:func:`sensitivity` (also ``fxcompress.sensitivity``) measures every single change (each
quantizable layer at each precision, each prunable group at each ratio) against the float
model and returns a :class:`Sensitivity` (a table, JSON, plots); :mod:`.latency` measures the
latency of layer shapes on this CPU (a cached table) beside MACs and parameters. The budget
passes ``mixed_precision`` and ``prune_to_budget`` build on both. See docs/budget.md.
"""

from .analysis import CACHE_ENV, cache_directory, clear_memory_cache, sensitivity
from .candidates import BITS
from .latency import LatencyTable, layer_key, resource
from .measure import OutputSQNR, check_metric, evaluate_metric
from .result import Entry, Sensitivity

__all__ = ["sensitivity", "Sensitivity", "Entry", "BITS", "OutputSQNR", "check_metric", "evaluate_metric",
           "CACHE_ENV", "cache_directory", "clear_memory_cache", "LatencyTable", "layer_key", "resource"]
