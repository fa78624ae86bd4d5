"""Resources a budget counts: MACs, parameters, and latency measured on this CPU (a cached table).

See :mod:`fxcompress.budget.latency` and docs/budget.md.
"""

from .latency import LatencyTable, layer_key, resource

__all__ = ["LatencyTable", "layer_key", "resource"]
