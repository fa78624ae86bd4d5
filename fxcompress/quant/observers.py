"""Observers: modules that watch tensors during calibration and pick qparams.

The contract (``forward`` returns its input unchanged, ``calculate_qparams``,
``merge``, the ``where`` label) is :class:`~fxcompress.quant.observer_base.Observer`'s.
Merge semantics in one place:

* min/max (:class:`MinMaxObserver`): exact.
* moving average: ``a.merge(b)`` equals observing ``a``'s batches and then
  ``b``'s (so it depends on the order, as a moving average does).
* histogram, percentile, per-tensor MSE: exact for histograms sharing a grid
  (call ``fix_range`` with the same range on every worker first), re-binned
  (approximate) otherwise.
* per-channel MSE: exact where both have the same per-channel range.

:func:`make_observer` builds the observer a :class:`QuantSpec` asks for.
"""

from __future__ import annotations

import torch

from fxcompress.quant import codecs
from fxcompress.quant.hist_observers import HistogramObserver, MSEObserver, PercentileObserver
from fxcompress.quant.observer_base import Observer
from fxcompress.quant.qparams import compute_qparams, reduction_view
from fxcompress.quant.spec import QuantSpec

__all__ = [
    "Observer",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "HistogramObserver",
    "PercentileObserver",
    "MSEObserver",
    "PerChannelMSEObserver",
    "make_observer",
]


class MinMaxObserver(Observer):
    """Running min and max (per tensor, channel or group).  Merge is exact."""

    kind = "minmax"

    def __init__(self, spec: QuantSpec, where: str = "") -> None:
        super().__init__(spec, where)
        self.register_buffer("min_val", torch.zeros(0))
        self.register_buffer("max_val", torch.zeros(0))

    def _observe(self, x: torch.Tensor) -> None:
        lo, hi = self._extremes(x)
        if not self.has_data:
            self.min_val, self.max_val = lo, hi
            return
        self._check_shape("min/max", self.min_val, lo)
        self.min_val = torch.minimum(self.min_val, lo)
        self.max_val = torch.maximum(self.max_val, hi)

    def _merge(self, other: Observer) -> None:
        self._check_shape("merged min/max", self.min_val, other.min_val)
        self.min_val = torch.minimum(self.min_val, other.min_val)
        self.max_val = torch.maximum(self.max_val, other.max_val)

    def compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.min_val, self.max_val


class MovingAverageMinMaxObserver(Observer):
    """Exponential moving average of each batch's min and max.

    ``m <- m + c * (batch - m)`` with ``c = spec.averaging_constant``; the
    first batch initialises ``m``.  ``a.merge(b)`` equals one observer that saw
    ``a``'s batches and then ``b``'s, up to float rounding: it keeps ``b``'s
    first batch values to undo ``b``'s initialisation.  ``b.merge(a)`` is
    the other order and differs, as moving averages do.
    """

    kind = "moving_average"

    def __init__(self, spec: QuantSpec, where: str = "") -> None:
        super().__init__(spec, where)
        for name in ("min_val", "max_val", "first_min", "first_max"):
            self.register_buffer(name, torch.zeros(0))

    def _observe(self, x: torch.Tensor) -> None:
        lo, hi = self._extremes(x)
        if not self.has_data:
            self.min_val, self.max_val = lo, hi
            self.first_min, self.first_max = lo.clone(), hi.clone()
            return
        self._check_shape("min/max", self.min_val, lo)
        c = self.spec.averaging_constant
        self.min_val = self.min_val + c * (lo - self.min_val)
        self.max_val = self.max_val + c * (hi - self.max_val)

    def _merge(self, other: Observer) -> None:
        self._check_shape("merged min/max", self.min_val, other.min_val)
        # other's average started from its first batch y1; continuing from
        # ours instead changes it by decay * (ours - y1), decay = (1-c)^n.
        decay = (1.0 - self.spec.averaging_constant) ** int(other.num_observed)
        self.min_val = other.min_val + decay * (self.min_val - other.first_min)
        self.max_val = other.max_val + decay * (self.max_val - other.first_max)

    def compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.min_val, self.max_val


# Clipping ratios the per-channel MSE observer scores (step 0.02).
_MSE_RATIOS = torch.linspace(0.2, 1.0, 41, dtype=torch.float64)


class PerChannelMSEObserver(Observer):
    """Per-channel / per-group clipping ratio minimising the exact quantization MSE.

    For each channel (or group) it keeps the running min/max and, for each
    ratio ``r`` in 0.20, 0.22, ..., 1.00, the exact squared error of
    quantizing the observed values with the range ``r * [min, max]``; the
    qparams use the best ratio per channel.  Meant for weights, which are
    the same tensor each time: when a tensor widens a channel's range, that
    channel's scores restart from this tensor (scores for the old range do
    not apply to the new one).  ``merge`` is exact where both observers have
    the same range for a channel; otherwise it keeps the scores of the one
    whose range equals the union, or sums both when neither does
    (approximate).  Cost: 41 quantize passes over each observed tensor.
    """

    kind = "mse"
    granularities = ("per_channel", "per_group")
    _fxc_leading_dims = {"errors": (len(_MSE_RATIOS),)}  # artifact codec: one score per ratio and qparam

    def __init__(self, spec: QuantSpec, where: str = "") -> None:
        super().__init__(spec, where)
        for name in ("min_val", "max_val"):
            self.register_buffer(name, torch.zeros(0))
        self.register_buffer("errors", torch.zeros(0, dtype=torch.float64))

    def _observe(self, x: torch.Tensor) -> None:
        lo, hi = self._extremes(x)
        if not self.has_data:
            self.min_val, self.max_val = lo, hi
            self.errors = torch.zeros((len(_MSE_RATIOS), *lo.shape), dtype=torch.float64)
        else:
            self._check_shape("min/max", self.min_val, lo)
            new_lo, new_hi = torch.minimum(self.min_val, lo), torch.maximum(self.max_val, hi)
            widened = (new_lo < self.min_val) | (new_hi > self.max_val)
            self.errors = torch.where(widened, torch.zeros_like(self.errors), self.errors)
            self.min_val, self.max_val = new_lo, new_hi
        self.errors = self.errors + self._score(x)

    def _score(self, x: torch.Tensor) -> torch.Tensor:
        """Squared error per ratio and channel of quantizing ``x``."""
        view = reduction_view(x.float(), self.spec, where=self.where)
        scores = []
        for ratio in _MSE_RATIOS.tolist():
            scale, zp = compute_qparams(ratio * self.min_val, ratio * self.max_val, self.spec)
            s, z = scale.unsqueeze(-1), zp.unsqueeze(-1)
            deq = (torch.clamp(torch.round(view / s) + z, self.spec.qmin, self.spec.qmax) - z) * s
            scores.append(((deq - view) ** 2).sum(dim=-1, dtype=torch.float64))
        return torch.stack(scores)

    def _merge(self, other: Observer) -> None:
        self._check_shape("merged min/max", self.min_val, other.min_val)
        lo = torch.minimum(self.min_val, other.min_val)
        hi = torch.maximum(self.max_val, other.max_val)
        mine = (self.min_val == lo) & (self.max_val == hi)
        theirs = (other.min_val == lo) & (other.max_val == hi)
        neither = ~mine & ~theirs
        zero = torch.zeros_like(self.errors)
        self.errors = (torch.where(mine | neither, self.errors, zero)
                       + torch.where(theirs | neither, other.errors, zero))
        self.min_val, self.max_val = lo, hi

    def compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        best = _MSE_RATIOS.to(torch.float32)[self.errors.argmin(dim=0)]
        return best * self.min_val, best * self.max_val


_BY_KIND: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageMinMaxObserver,
    "histogram": HistogramObserver,
    "percentile": PercentileObserver,
}


# Storable in artifacts (codec: Observer._fxc_config / _fxc_from_config).
for _cls in (MinMaxObserver, MovingAverageMinMaxObserver, PerChannelMSEObserver):
    codecs.register(_cls)


def make_observer(spec: QuantSpec, where: str = "") -> Observer:
    """A fresh observer for ``spec`` (``spec.observer`` picks the class).

    ``"mse"`` gives :class:`MSEObserver` per tensor and
    :class:`PerChannelMSEObserver` per channel or group.
    """
    if spec.observer == "mse":
        cls: type[Observer] = MSEObserver if spec.granularity == "per_tensor" else PerChannelMSEObserver
    else:
        cls = _BY_KIND[spec.observer]
    return cls(spec, where)
