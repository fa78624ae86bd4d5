"""Sensitivity analysis: what quantizing one layer or pruning one channel group costs.

:func:`sensitivity` measures every single change (each quantizable layer at each
precision, each prunable group at each ratio) against the float model and
returns a :class:`Sensitivity` (a table, JSON, plots); the budget passes
``mixed_precision`` and ``prune_to_budget`` build on it.  See docs/budget.md.
"""

from .analysis import CACHE_ENV, cache_directory, clear_memory_cache, sensitivity
from .candidates import BITS
from .measure import OutputSQNR, check_metric, evaluate_metric
from .result import Entry, Sensitivity

__all__ = ["sensitivity", "Sensitivity", "Entry", "BITS", "OutputSQNR", "check_metric", "evaluate_metric",
           "CACHE_ENV", "cache_directory", "clear_memory_cache"]
