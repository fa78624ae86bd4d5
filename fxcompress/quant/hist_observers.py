"""Histogram-backed observers: L2-optimal range, percentile, MSE clipping.

All three share the per-batch work (one ``aminmax`` and one exact histogram
pass over a grid that only grows, by exact integer-factor rebinning, when a
batch falls outside it) and differ only in how ``calculate_qparams`` picks the range from
the final histogram, which runs once at the end of calibration:

* :class:`HistogramObserver`: the range minimising the modelled squared
  quantization error (like torch.ao's ``_non_linear_param_search``, but a
  vectorised closed-form search over both ends instead of a greedy walk).
* :class:`PercentileObserver`: the ``100-p`` / ``p`` percentiles.
* :class:`MSEObserver`: one clipping ratio ``r`` applied to ``[min, max]``.

Merge is exact when both histograms share a grid: give every worker the same
``fix_range(lo, hi)`` before observing.  Otherwise the other histogram is
re-binned onto this one's (grown) grid, spreading each bin uniformly:
approximate, to about a bin width.  With a fixed grid, values outside it are
counted in the edge bins (and still define min/max).
"""

from __future__ import annotations

import math
from abc import abstractmethod

import torch

from fxcompress.errors import ConfigError
from fxcompress.quant import codecs
from fxcompress.quant.histogram import (
    accumulate, f32_down, f32_up, flat_memory_view, grown_grid, percentile_range, rebin,
    rebin_aligned, search_clip_ratio, search_l2_range,
)
from fxcompress.quant.observer_base import Observer
from fxcompress.quant.spec import QuantSpec

__all__ = ["HistogramRangeObserver", "HistogramObserver", "PercentileObserver", "MSEObserver"]


class HistogramRangeObserver(Observer):
    """Base of the histogram-backed observers (per tensor only).

    State: ``histogram`` (float64 counts, ``spec.bins`` of them), ``grid``
    (float64 ``[lo, hi]``, float32-exact values), ``fixed`` and the exact
    ``min_val``/``max_val``.  Until data of two distinct values is seen the
    grid is the single point ``[v, v]``.
    """

    granularities = ("per_tensor",)

    def __init__(self, spec: QuantSpec, where: str = "") -> None:
        super().__init__(spec, where)
        self.register_buffer("histogram", torch.zeros(self.spec.bins, dtype=torch.float64))
        self.register_buffer("grid", torch.zeros(2, dtype=torch.float64))
        self.register_buffer("fixed", torch.zeros((), dtype=torch.bool))
        self.register_buffer("min_val", torch.zeros(()))
        self.register_buffer("max_val", torch.zeros(()))

    def fix_range(self, min_val: float, max_val: float) -> "HistogramRangeObserver":
        """Pin the histogram grid to ``[min_val, max_val]`` before observing.

        Observers pinned to the same range merge exactly.  Values outside it
        are counted in the edge bins.
        """
        if self.has_data:
            raise ConfigError(f"{self._label()}: fix_range must be called before any data is observed")
        if not (math.isfinite(min_val) and math.isfinite(max_val) and min_val < max_val):
            raise ConfigError(
                f"{self._label()}: fix_range needs finite min_val < max_val, got "
                f"[{min_val}, {max_val}]"
            )
        self.grid = torch.tensor([f32_down(min_val), f32_up(max_val)], dtype=torch.float64)
        self.fixed = torch.ones((), dtype=torch.bool)
        return self

    def _grid(self) -> tuple[float, float]:
        return float(self.grid[0]), float(self.grid[1])

    def _observe(self, x: torch.Tensor) -> None:
        flat = flat_memory_view(x if x.dtype == torch.float32 else x.float())
        batch_min, batch_max = self._extremes(flat)
        a, b = float(batch_min), float(batch_max)
        first = not self.has_data
        self.min_val = batch_min if first else torch.minimum(self.min_val, batch_min)
        self.max_val = batch_max if first else torch.maximum(self.max_val, batch_max)
        fixed = bool(self.fixed)
        lo, hi = self._grid()
        outside = a < lo or b > hi
        if not fixed and first:
            lo, hi = a, b
        elif not fixed and outside:
            lo, hi = self._cover(min(a, lo), max(b, hi))
        self.grid = torch.tensor([lo, hi], dtype=torch.float64)
        # A pinned grid counts values outside it in its edge bins.
        self.histogram = accumulate(self.histogram, lo, hi, flat, clamp=fixed and outside)

    def _cover(self, need_lo: float, need_hi: float) -> tuple[float, float]:
        """Grow the (unfixed) grid to cover ``[need_lo, need_hi]``, moving counts."""
        lo, hi = self._grid()
        if lo == hi:
            self.histogram = rebin(self.histogram, lo, hi, need_lo, need_hi, self.spec.bins)
            return need_lo, need_hi
        new_lo, new_hi, k, m = grown_grid(lo, hi, self.spec.bins, need_lo, need_hi)
        self.histogram = rebin_aligned(self.histogram, k, m)
        return new_lo, new_hi

    def _merge(self, other: Observer) -> None:
        assert isinstance(other, HistogramRangeObserver)
        self.min_val = torch.minimum(self.min_val, other.min_val)
        self.max_val = torch.maximum(self.max_val, other.max_val)
        self._add_histogram(other)

    def _adopt(self, other: Observer) -> None:
        if not bool(self.fixed):
            super()._adopt(other)
            return
        assert isinstance(other, HistogramRangeObserver)
        # Keep our pinned grid: other's counts are re-binned onto it.
        self.min_val, self.max_val = other.min_val.clone(), other.max_val.clone()
        self._add_histogram(other)

    def _add_histogram(self, other: "HistogramRangeObserver") -> None:
        o_lo, o_hi = other._grid()
        if torch.equal(self.grid, other.grid):
            self.histogram = self.histogram + other.histogram
            return
        lo, hi = self._grid()
        if not bool(self.fixed) and (o_lo < lo or o_hi > hi):
            lo, hi = self._cover(min(o_lo, lo), max(o_hi, hi))
            self.grid = torch.tensor([lo, hi], dtype=torch.float64)
        self.histogram = self.histogram + rebin(other.histogram, o_lo, o_hi, lo, hi, self.spec.bins)

    def compute_range(self) -> tuple[float, float]:
        lo, hi = self._grid()
        mn, mx = float(self.min_val), float(self.max_val)
        if lo == hi or mn == mx:
            return mn, mx
        return self._range_from_histogram(self.histogram, lo, hi, mn, mx)

    @abstractmethod
    def _range_from_histogram(self, counts: torch.Tensor, lo: float, hi: float,
                              mn: float, mx: float) -> tuple[float, float]:
        """The range for a histogram over ``[lo, hi]`` of data within ``[mn, mx]``."""


class HistogramObserver(HistogramRangeObserver):
    """Range minimising the modelled L2 quantization error of the histogram.

    Searches the range's ends within the observed ``[min, max]`` (see
    :func:`~fxcompress.quant.histogram.search_l2_range`); outliers that cost
    more resolution than their clipping error are clipped.
    """

    kind = "histogram"

    def _range_from_histogram(self, counts: torch.Tensor, lo: float, hi: float,
                              mn: float, mx: float) -> tuple[float, float]:
        return search_l2_range(counts, lo, hi, mn, mx, self.spec)


class PercentileObserver(HistogramRangeObserver):
    """Range ``[P(100 - p), P(p)]`` with ``p = spec.percentile`` (to a bin width).

    Symmetric specs then use ``max(|P(100-p)|, |P(p)|)``, as
    :func:`~fxcompress.quant.qparams.compute_qparams` does for any range.
    """

    kind = "percentile"

    def _range_from_histogram(self, counts: torch.Tensor, lo: float, hi: float,
                              mn: float, mx: float) -> tuple[float, float]:
        return percentile_range(counts, lo, hi, mn, mx, self.spec.percentile)


class MSEObserver(HistogramRangeObserver):
    """Per-tensor ``r * [min, max]`` for the clipping ratio ``r`` in (0, 1]
    minimising the modelled quantization MSE of the histogram.

    For per-channel / per-group tensors use
    :class:`~fxcompress.quant.observers.PerChannelMSEObserver`.
    """

    kind = "mse"

    def _range_from_histogram(self, counts: torch.Tensor, lo: float, hi: float,
                              mn: float, mx: float) -> tuple[float, float]:
        return search_clip_ratio(counts, lo, hi, mn, mx, self.spec)


# Storable in artifacts (codec: Observer._fxc_config / _fxc_from_config).
for _cls in (HistogramObserver, PercentileObserver, MSEObserver):
    codecs.register(_cls)
