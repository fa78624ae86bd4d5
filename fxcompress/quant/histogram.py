"""Histogram arithmetic behind the histogram, percentile and MSE observers.

A histogram here is ``(counts, lo, hi)``: ``counts`` is a float64 vector of
``bins`` entries over the uniform grid ``[lo, hi]``; ``lo``/``hi`` are float32
values (compared with the float32 data, so a value is inside the grid exactly
when it is inside ``[lo, hi]``).  ``lo == hi`` is a *point* histogram: every count sits at ``lo``.

* :func:`grown_grid` widens a grid to cover new data by an integer factor,
  with the new edges on old edges, so :func:`rebin_aligned` moves counts
  exactly (each old bin falls into one new bin).  Per-batch cost is one
  ``aminmax`` and one histogram pass (:func:`accumulate`); rebinning touches
  ``bins`` numbers only.
* :func:`rebin` moves counts onto any other grid by linear interpolation of
  the cumulative counts: exact when the grids are aligned, approximate (mass
  spread uniformly within a bin) otherwise.
* :func:`range_error` models the squared quantization error of a candidate
  range, treating each bin's mass as uniform within the bin and integrating
  the error of the real quantizer (the qparams :func:`compute_qparams` gives
  for that range, clamping included) in closed form, vectorised over
  candidates.  The searches minimise it once, at the end of calibration.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from fxcompress.quant.qparams import compute_qparams
from fxcompress.quant.spec import QuantSpec

__all__ = [
    "f32_down",
    "f32_up",
    "flat_memory_view",
    "accumulate",
    "grown_grid",
    "rebin_aligned",
    "rebin",
    "range_error",
    "search_l2_range",
    "search_clip_ratio",
    "percentile_range",
]

_F32_MAX = float(np.finfo(np.float32).max)
# 1-D searches run _LEVELS rounds of _POINTS candidate ratios, each round
# zooming in around the previous best; the first round adds ratios 2**-j so a
# far outlier (optimal ratio << 1/_POINTS) is found too.  They evaluate the
# full-resolution histogram: a coarser copy would smear the spike of exact
# zeros after a ReLU into a bin wider than a quantization step and bias the
# search towards small ranges.
_POINTS = 32
_LEVELS = 3


def f32_down(value: float) -> float:
    """Largest float32 value <= ``value``."""
    v = np.float32(min(max(value, -_F32_MAX), _F32_MAX))
    if float(v) > value:
        v = np.nextafter(v, np.float32(-np.inf))
    return float(v)


def f32_up(value: float) -> float:
    """Smallest float32 value >= ``value``."""
    v = np.float32(min(max(value, -_F32_MAX), _F32_MAX))
    if float(v) < value:
        v = np.nextafter(v, np.float32(np.inf))
    return float(v)


def flat_memory_view(x: torch.Tensor) -> torch.Tensor:
    """``x`` flattened in memory order (a view for contiguous or channels-last
    tensors, so histogramming a channels-last activation copies nothing)."""
    if x.is_contiguous():
        return x.view(-1)
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    if x.ndim in formats and x.is_contiguous(memory_format=formats[x.ndim]):
        return x.as_strided((x.numel(),), (1,), x.storage_offset())
    return x.reshape(-1)


def accumulate(counts: torch.Tensor, lo: float, hi: float, flat: torch.Tensor,
               clamp: bool = False) -> torch.Tensor:
    """``counts`` plus the exact histogram of the float32 values ``flat``.

    Values must lie within ``[lo, hi]`` unless ``clamp``, which counts those
    outside in the edge bins.  Bins are ``[lo + j*w, lo + (j+1)*w)``, the last
    one closed.  Out of place: observer state may be an inference tensor
    (calibration runs under ``inference_mode``) and must stay updatable
    outside it.
    """
    bins = counts.numel()
    if lo == hi:
        counts = counts.clone()
        counts[0] += flat.numel()
        return counts
    # Bin indices by vectorised arithmetic, then bincount: about twice as
    # fast as torch.histc, whose scalar per-element loop dominates
    # calibration time.  x - lo is exact for x in [lo, hi], so the index
    # stays in [0, bins]; the value hi itself lands on index bins.
    factor = bins / (hi - lo)
    # Post-ReLU grids start at 0: skip a pass over the data.
    position = torch.mul(flat, factor) if lo == 0.0 else torch.sub(flat, lo).mul_(factor)
    if clamp:
        position.clamp_(0, bins - 1)
    index = position.to(torch.int16 if bins < 32767 else torch.int32)
    batch = torch.bincount(index, minlength=bins + 1).to(torch.float64)
    batch[bins - 1] += batch[bins]
    return counts + batch[:bins]


def grown_grid(lo: float, hi: float, bins: int, need_lo: float,
               need_hi: float) -> tuple[float, float, int, int]:
    """A grid covering ``[need_lo, need_hi]`` whose bins are unions of old bins.

    Returns ``(new_lo, new_hi, k, m)``: the new bin width is ``k`` old widths
    (``k`` a power of two) and the new grid starts ``m`` old bins below
    ``lo``.  Spare room goes to the side(s) the data grew on, so a grid that
    starts at 0 (post-ReLU data) stays at 0.  Needs ``lo < hi``.
    """
    width = (hi - lo) / bins
    down = max(0, math.ceil((lo - need_lo) / width))
    up = max(0, math.ceil((need_hi - hi) / width))
    k = 1 << max(1, math.ceil(math.log2((bins + down + up) / bins)))
    m_max = k * bins - bins - up
    if down and not up:
        m = m_max
    elif up and not down:
        m = down
    else:
        m = (down + m_max) // 2
    new_lo = f32_down(lo - m * width)
    new_hi = f32_up(new_lo + k * bins * width)
    return min(new_lo, need_lo), max(new_hi, need_hi), k, m


def rebin_aligned(counts: torch.Tensor, k: int, m: int) -> torch.Tensor:
    """Counts moved onto the grid :func:`grown_grid` returned (exact)."""
    bins = counts.numel()
    # Old bin centres in new-bin units are half-integers over k, never on an
    # edge, so floor() picks the one new bin containing the whole old bin.
    centres = (torch.arange(bins, dtype=torch.float64) + 0.5 + m) / k
    index = centres.floor().clamp_(0, bins - 1).long()
    return torch.zeros_like(counts).index_add_(0, index, counts)


def rebin(counts: torch.Tensor, lo: float, hi: float, new_lo: float, new_hi: float,
          new_bins: int) -> torch.Tensor:
    """Counts moved onto ``new_bins`` bins over ``[new_lo, new_hi]``.

    Interpolates the cumulative counts linearly within each source bin: exact
    when every new edge is an old edge, otherwise it assumes mass uniform
    within a bin.  Mass outside the new grid lands in its edge bins; the
    total is preserved.
    """
    total = counts.sum()
    if lo == hi:
        # A point mass: all of it goes to the bin that contains ``lo``.
        out = torch.zeros(new_bins, dtype=torch.float64)
        span = new_hi - new_lo
        pos = (lo - new_lo) / span * new_bins if span > 0 else 0.0
        out[min(max(math.floor(pos), 0), new_bins - 1)] = total
        return out
    bins = counts.numel()
    cum = torch.cat([torch.zeros(1, dtype=torch.float64), counts.cumsum(0)])
    edges = new_lo + torch.arange(new_bins + 1, dtype=torch.float64) * ((new_hi - new_lo) / new_bins)
    pos = ((edges - lo) / ((hi - lo) / bins)).clamp_(0, bins)
    left = pos.floor().clamp_(max=bins - 1)
    at = cum[left.long()] + (pos - left) * counts[left.long()]
    out = at.diff()
    out[0] += at[0]
    out[-1] += total - at[-1]
    return out


def _error_antiderivative(u: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """Integral of the squared quantization error (grid units) from ``qmin`` to ``u``.

    Inside ``[qmin, qmax]`` the integrand is ``(u - round(u))**2`` (integral
    ``1/12`` per level); outside it is the squared distance to the clamp.
    """
    uc = np.clip(u, qmin, qmax)
    nearest = np.floor(uc + 0.5)
    frac = uc - nearest
    outside = u - uc
    # Cubes as products: NumPy's pow of negative bases is ~40x slower.
    inside = nearest / 12.0 + (frac * frac * frac + 0.125) / 3.0 - (qmin / 12.0 + 1.0 / 24.0)
    return inside + outside * outside * outside / 3.0


def _trimmed(counts: torch.Tensor, lo: float, hi: float) -> tuple[np.ndarray, float, float]:
    """The counts as float64 NumPy without empty end bins (grids keep spare
    room after growing), and the trimmed grid."""
    array = counts.detach().cpu().numpy().astype(np.float64)
    nonzero = np.flatnonzero(array)
    first, last = int(nonzero[0]), int(nonzero[-1])
    width = (hi - lo) / array.size
    return array[first:last + 1], lo + first * width, lo + (last + 1) * width


def range_error(counts: np.ndarray, lo: float, hi: float, cand_lo: np.ndarray,
                cand_hi: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """Modelled total squared error of quantizing the histogram ``counts``
    over ``[lo, hi]`` with each candidate range ``[cand_lo[i], cand_hi[i]]``.

    NumPy, float64, shape ``[K]``.  The searches run in NumPy because their
    arrays are small: torch would spread each of their many small ops over
    the intra-op thread pool, and the synchronisation costs more than the
    arithmetic (badly so on a busy machine).
    """
    scale, zero_point = compute_qparams(torch.from_numpy(cand_lo), torch.from_numpy(cand_hi), spec)
    s = scale.numpy().astype(np.float64)[:, None]
    width = (hi - lo) / counts.size
    edges = lo + np.arange(counts.size + 1, dtype=np.float64) * width
    u = edges / s + zero_point.numpy().astype(np.float64)[:, None]
    per_bin = np.diff(_error_antiderivative(u, spec.qmin, spec.qmax), axis=1)
    return (per_bin @ (counts / width)) * s[:, 0] ** 3


def _search_ratio(error_at: Callable[[np.ndarray], np.ndarray], start: float = 1.0) -> float:
    """Ratio in (0, 1] minimising ``error_at(ratios)``, zooming in ``_LEVELS`` times.

    ``start`` and every round's best are candidates of the next round, so the
    result is never worse than ``start``.
    """
    ratios = np.concatenate([np.arange(1, _POINTS + 1) / _POINTS,
                             2.0 ** -np.arange(6, 13), [start]])
    step = 1.0 / _POINTS
    best = start
    for _ in range(_LEVELS):
        best = float(ratios[int(np.argmin(error_at(ratios)))])
        low, high = max(best - step, step / _POINTS), min(best + step, 1.0)
        ratios = np.append(np.linspace(low, high, _POINTS), best)
        step = (high - low) / (_POINTS - 1)
    return best


def _evaluator(counts: np.ndarray, lo: float, hi: float, spec: QuantSpec,
               family: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
               ) -> Callable[[np.ndarray], np.ndarray]:
    def error_at(ratios: np.ndarray) -> np.ndarray:
        cand_lo, cand_hi = family(ratios)
        return range_error(counts, lo, hi, cand_lo, cand_hi, spec)

    return error_at


def search_l2_range(counts: torch.Tensor, lo: float, hi: float, min_val: float,
                    max_val: float, spec: QuantSpec) -> tuple[float, float]:
    """Range within ``[min_val, max_val]`` (widened to contain 0) minimising
    :func:`range_error`.

    Symmetric specs search the threshold ``t`` of ``[-t, t]``; affine specs
    search the upper and lower ends in turn (coordinate descent, at most three
    rounds; one search when an end is pinned at 0), each a zooming 1-D search
    that starts from the current range.  Never worse, under the model, than
    the full min/max range, where the search starts.
    """
    array, lo, hi = _trimmed(counts, lo, hi)
    neg, pos = min(min_val, 0.0), max(max_val, 0.0)
    if spec.symmetric:
        top = max(-neg, pos)
        ratio = _search_ratio(_evaluator(array, lo, hi, spec, lambda r: (-r * top, r * top)))
        return -ratio * top, ratio * top
    best_lo, best_hi = neg, pos
    # One end pinned at 0 (e.g. post-ReLU data) leaves a single 1-D search.
    rounds = 3 if neg < 0 < pos else 1
    for _ in range(rounds):
        previous = (best_lo, best_hi)
        if pos > 0:
            fixed_lo = best_lo
            ratio = _search_ratio(_evaluator(
                array, lo, hi, spec, lambda r: (np.full_like(r, fixed_lo), r * pos)),
                start=best_hi / pos)
            best_hi = ratio * pos
        if neg < 0:
            fixed_hi = best_hi
            ratio = _search_ratio(_evaluator(
                array, lo, hi, spec, lambda r: (r * neg, np.full_like(r, fixed_hi))),
                start=best_lo / neg)
            best_lo = ratio * neg
        if (best_lo, best_hi) == previous:
            break
    return best_lo, best_hi


def search_clip_ratio(counts: torch.Tensor, lo: float, hi: float, min_val: float,
                      max_val: float, spec: QuantSpec) -> tuple[float, float]:
    """``r * [min_val, max_val]`` (widened to contain 0) for the clipping ratio
    ``r`` in (0, 1] minimising :func:`range_error`."""
    array, lo, hi = _trimmed(counts, lo, hi)
    neg, pos = min(min_val, 0.0), max(max_val, 0.0)
    ratio = _search_ratio(_evaluator(array, lo, hi, spec, lambda r: (r * neg, r * pos)))
    return ratio * neg, ratio * pos


def percentile_range(counts: torch.Tensor, lo: float, hi: float, min_val: float,
                     max_val: float, percentile: float) -> tuple[float, float]:
    """The ``100 - percentile`` and ``percentile`` percentiles of the histogram.

    Interpolated linearly within a bin, so accurate to one bin width; clamped
    to ``[min_val, max_val]`` (exactly those at ``percentile == 100``).
    """
    if percentile >= 100.0 or lo == hi:
        return min_val, max_val
    array = counts.detach().cpu().numpy().astype(np.float64)
    cum = np.cumsum(array)
    width = (hi - lo) / array.size

    def value_at(fraction: float) -> float:
        target = fraction * cum[-1]
        index = min(int(np.searchsorted(cum, target)), array.size - 1)
        before = cum[index - 1] if index else 0.0
        inside = (target - before) / max(array[index], 1e-300)
        return lo + (index + min(max(inside, 0.0), 1.0)) * width

    low = value_at(1.0 - percentile / 100.0)
    high = value_at(percentile / 100.0)
    return max(low, min_val), min(high, max_val)
