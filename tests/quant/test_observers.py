"""Observers: closed-form ranges, searches on outlier-heavy data, merge, errors."""

from __future__ import annotations

import copy

import pytest
import torch

from fxcompress.errors import CalibrationError, ConfigError
from fxcompress.quant import (
    kernel_scale,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    PercentileObserver,
    PerChannelMSEObserver,
    QuantSpec,
    compute_qparams,
    default_activation_spec,
    default_weight_spec,
    fake_quantize,
    make_observer,
)

AFFINE_U8 = QuantSpec(signed=False, symmetric=False)


def _mse(x: torch.Tensor, lo: float, hi: float, spec: QuantSpec) -> float:
    """True quantization MSE of ``x`` with the qparams of range ``[lo, hi]``."""
    scale, zp = compute_qparams(lo, hi, spec)
    with torch.no_grad():
        return float(((fake_quantize(x, scale, zp, spec) - x) ** 2).mean())


def _observe(observer, batches):  # type: ignore[no-untyped-def]
    for batch in batches:
        assert observer(batch) is batch
    return observer


def _gaussian_with_outliers(n: int, outliers: list[float]) -> torch.Tensor:
    x = torch.randn(n)
    x[: len(outliers)] = torch.tensor(outliers)  # a few huge values
    return x[torch.randperm(n)]


def _scan_best(x: torch.Tensor, spec: QuantSpec) -> float:
    """Least true MSE over 40 geometrically spaced upper ends (brute force)."""
    lo = float(x.min())
    ends = torch.logspace(0.3, torch.log10(x.max()).item(), 40).tolist()
    return min(_mse(x, -t if spec.symmetric else lo, t, spec) for t in ends)


# (bits, data, tightness): the L2-optimal upper end is below tightness * max.
# It clips an outlier when the resolution gained over the bulk outweighs the
# outlier's clipping error: at 4 bits eight outliers in 400k values are
# clipped hard, at 8 bits one outlier in a million is clipped part way.
OUTLIER_CASES = [
    (4, lambda: _gaussian_with_outliers(400_000, torch.linspace(25.0, 60.0, 8).tolist()), 0.25),
    (8, lambda: _gaussian_with_outliers(1_000_000, [80.0]), 0.5),
]


# ----------------------------------------------------------------- closed form


def test_minmax_per_tensor_closed_form() -> None:
    obs = _observe(MinMaxObserver(AFFINE_U8), [torch.tensor([0.5, -1.0]), torch.tensor([3.0, 0.0])])
    assert obs.compute_range() == (torch.tensor(-1.0), torch.tensor(3.0))
    scale, zp = obs.calculate_qparams()
    assert torch.equal(scale, kernel_scale(torch.tensor(4.0 / 255))) and int(zp) == 64


def test_minmax_per_channel_and_per_group() -> None:
    x = torch.randn(2, 3, 4, 4)
    obs = _observe(MinMaxObserver(QuantSpec(granularity="per_channel", axis=1)), [x])
    assert torch.equal(obs.min_val, x.amin(dim=(0, 2, 3)))
    scale, zp = obs.calculate_qparams()
    assert scale.shape == (3,) and not zp.any()
    w = torch.randn(4, 16)
    grouped = _observe(MinMaxObserver(QuantSpec(granularity="per_group", group_size=8)), [w])
    assert torch.equal(grouped.max_val, w.reshape(4, 2, 8).amax(-1))
    assert grouped.calculate_qparams()[0].shape == (4, 2)


def test_moving_average_closed_form() -> None:
    spec = QuantSpec(observer="moving_average", averaging_constant=0.5)
    obs = _observe(MovingAverageMinMaxObserver(spec),
                   [torch.tensor([-2.0, 2.0]), torch.tensor([-4.0, 6.0])])
    assert obs.compute_range() == (torch.tensor(-3.0), torch.tensor(4.0))


def test_symmetric_observers_use_zero_point_zero() -> None:
    spec = default_weight_spec()
    for cls in (MinMaxObserver, MovingAverageMinMaxObserver, PerChannelMSEObserver):
        _, zp = _observe(cls(spec), [torch.randn(8, 5) + 3]).calculate_qparams()
        assert not zp.any(), cls.__name__


def test_make_observer_picks_the_class() -> None:
    assert isinstance(make_observer(default_activation_spec()), HistogramObserver)
    assert isinstance(make_observer(default_weight_spec()), MinMaxObserver)
    assert isinstance(make_observer(QuantSpec(observer="mse")), MSEObserver)
    assert isinstance(make_observer(QuantSpec(observer="mse", granularity="per_channel")),
                      PerChannelMSEObserver)
    assert isinstance(make_observer(QuantSpec(observer="percentile")), PercentileObserver)
    assert make_observer(QuantSpec(), where="layer1.conv").where == "layer1.conv"


# ----------------------------------------------------------------- histogram family


def test_histogram_counts_every_element_while_the_grid_grows() -> None:
    obs = HistogramObserver(default_activation_spec())
    batches = [torch.rand(1000) * scale for scale in (1.0, 3.0, 2.0, 50.0)] + [-torch.rand(500)]
    _observe(obs, batches)
    assert float(obs.histogram.sum()) == 4500
    everything = torch.cat(batches)
    assert float(obs.min_val) == float(everything.min())
    assert float(obs.max_val) == float(everything.max())
    lo, hi = obs.grid.tolist()
    assert lo <= float(everything.min()) and hi >= float(everything.max())


def test_histogram_bins_match_histc() -> None:
    x = torch.randn(4, 3, 10, 10)
    obs = _observe(HistogramObserver(AFFINE_U8.replace(observer="histogram", bins=64)), [x])
    lo, hi = obs.grid.tolist()
    assert (lo, hi) == (float(x.min()), float(x.max()))
    assert torch.equal(obs.histogram, torch.histc(x, 64, lo, hi).double())


@pytest.mark.parametrize("bits, data, tightness", OUTLIER_CASES)
@pytest.mark.parametrize("symmetric", [False, True])
def test_histogram_search_clips_outliers(bits: int, data, tightness: float,  # type: ignore[no-untyped-def]
                                         symmetric: bool) -> None:
    x = data()
    spec = QuantSpec(bits=bits, signed=symmetric, symmetric=symmetric, observer="histogram")
    lo, hi = _observe(HistogramObserver(spec), x.chunk(4)).compute_range()
    assert hi < tightness * float(x.max())
    searched = _mse(x, lo, hi, spec)
    assert searched < 0.75 * _mse(x, float(x.min()), float(x.max()), spec)
    assert searched <= 1.05 * _scan_best(x, spec)


def test_histogram_search_keeps_the_range_without_outliers() -> None:
    x = torch.rand(200_000) * 4.0  # uniform: clipping only hurts
    lo, hi = _observe(HistogramObserver(AFFINE_U8.replace(observer="histogram")), [x]).compute_range()
    assert lo == 0.0 and hi > 0.98 * float(x.max())


def test_histogram_search_on_post_relu_data() -> None:
    x = torch.relu(_gaussian_with_outliers(1_000_000, [80.0]))
    spec = default_activation_spec()
    lo, hi = _observe(HistogramObserver(spec), x.chunk(8)).compute_range()
    assert lo == 0.0 and hi < 0.7 * float(x.max())
    searched = _mse(x, lo, hi, spec)
    assert searched < 0.75 * _mse(x, 0.0, float(x.max()), spec)
    assert searched <= 1.05 * _scan_best(x, spec)


def test_percentile_matches_the_data_percentile() -> None:
    x = torch.randn(300_000)
    spec = QuantSpec(observer="percentile", percentile=99.0, symmetric=False, signed=False)
    obs = _observe(PercentileObserver(spec), x.chunk(3))
    lo, hi = obs.compute_range()
    bin_width = float(obs.grid[1] - obs.grid[0]) / spec.bins
    expected = torch.quantile(x[:100_000], torch.tensor([0.01, 0.99]))  # quantile's size limit
    full = torch.sort(x).values
    exact_lo, exact_hi = float(full[int(0.01 * len(x))]), float(full[int(0.99 * len(x))])
    assert abs(lo - exact_lo) <= 2 * bin_width and abs(hi - exact_hi) <= 2 * bin_width
    assert abs(hi - float(expected[1])) < 0.05
    assert PercentileObserver(spec.replace(percentile=100.0))(x) is x


@pytest.mark.parametrize("bits, factor", [(4, 0.5), (8, 0.9)])
def test_mse_observer_beats_minmax_on_heavy_tails(bits: int, factor: float) -> None:
    x = torch.distributions.Laplace(0.0, 1.0).sample((200_000,))
    spec = QuantSpec(bits=bits, observer="mse")
    lo, hi = _observe(MSEObserver(spec), x.chunk(2)).compute_range()
    assert _mse(x, lo, hi, spec) < factor * _mse(x, float(x.min()), float(x.max()), spec)


def test_per_channel_mse_beats_minmax_per_channel() -> None:
    w = torch.distributions.Laplace(0.0, torch.linspace(0.1, 1.0, 16).unsqueeze(1)).sample((256,))
    w = w.squeeze(-1).T.contiguous()  # [16 channels, 256]
    spec = QuantSpec(bits=4, granularity="per_channel", observer="mse")
    obs = _observe(PerChannelMSEObserver(spec), [w, w])
    scale, zp = obs.calculate_qparams()
    err = ((fake_quantize(w, scale, zp, spec) - w) ** 2).mean(dim=1)
    ref_scale, ref_zp = compute_qparams(w.amin(1), w.amax(1), spec)
    ref = ((fake_quantize(w, ref_scale, ref_zp, spec) - w) ** 2).mean(dim=1)
    assert bool((err <= ref).all()) and float(err.sum()) < 0.8 * float(ref.sum())


# ----------------------------------------------------------------- merge


def test_minmax_merge_equals_single_pass() -> None:
    batches = [torch.randn(3, 5, 7) * (i + 1) for i in range(4)]
    spec = QuantSpec(granularity="per_channel", axis=1)
    single = _observe(MinMaxObserver(spec), batches)
    merged = _observe(MinMaxObserver(spec), batches[:2]).merge(_observe(MinMaxObserver(spec), batches[2:]))
    for a, b in zip(single.calculate_qparams(), merged.calculate_qparams()):
        assert torch.equal(a, b)
    assert int(merged.num_observed) == 4


def test_moving_average_merge_is_sequential() -> None:
    batches = [torch.randn(100) * (1 + i % 3) + i for i in range(7)]
    spec = QuantSpec(observer="moving_average", averaging_constant=0.2, granularity="per_tensor")
    single = _observe(MovingAverageMinMaxObserver(spec), batches)
    first = _observe(MovingAverageMinMaxObserver(spec), batches[:3])
    second = _observe(MovingAverageMinMaxObserver(spec), batches[3:])
    swapped = copy.deepcopy(second).merge(first)
    merged = first.merge(second)
    assert torch.allclose(merged.min_val, single.min_val) and torch.allclose(merged.max_val, single.max_val)
    assert not torch.allclose(swapped.max_val, single.max_val)  # order matters


def test_histogram_merge_on_a_fixed_grid_is_exact() -> None:
    batches = [torch.relu(torch.randn(5000)) * (i + 1) for i in range(4)]
    spec = default_activation_spec()
    make = lambda: HistogramObserver(spec).fix_range(0.0, 6.0)  # noqa: E731  (data exceeds it)
    single = _observe(make(), batches)
    merged = _observe(make(), batches[:1]).merge(_observe(make(), batches[1:]))
    assert torch.equal(single.histogram, merged.histogram)
    assert single.compute_range() == merged.compute_range()
    assert float(merged.max_val) == float(torch.cat(batches).max())


def test_histogram_merge_across_grids_is_close() -> None:
    batches = [torch.randn(20_000) * (i + 1) for i in range(4)]
    spec = AFFINE_U8.replace(observer="histogram")
    single = _observe(HistogramObserver(spec), batches)
    merged = _observe(HistogramObserver(spec), batches[:2]).merge(_observe(HistogramObserver(spec), batches[2:]))
    assert float(merged.histogram.sum()) == 80_000
    (s1, _), (s2, _) = single.calculate_qparams(), merged.calculate_qparams()
    assert abs(float(s1) - float(s2)) < 0.05 * float(s1)


def test_merge_into_an_empty_observer_copies_state() -> None:
    full = _observe(HistogramObserver(default_activation_spec()), [torch.rand(100)])
    empty = HistogramObserver(default_activation_spec())
    assert torch.equal(empty.merge(full).histogram, full.histogram)


def test_merge_rejects_a_different_spec() -> None:
    with pytest.raises(ConfigError, match="same type and spec"):
        MinMaxObserver(QuantSpec(bits=4)).merge(MinMaxObserver(QuantSpec(bits=8)))


# ----------------------------------------------------------------- state and odd input


def test_state_dict_round_trip_into_a_fresh_observer() -> None:
    spec = QuantSpec(granularity="per_channel", observer="mse", bits=4)
    for fresh, calibrated in [
        (make_observer(spec), _observe(make_observer(spec), [torch.randn(6, 9)])),
        (make_observer(default_activation_spec()),
         _observe(make_observer(default_activation_spec()), [torch.rand(300), torch.rand(30) * 5])),
    ]:
        fresh.load_state_dict(calibrated.state_dict())
        for a, b in zip(fresh.calculate_qparams(), calibrated.calculate_qparams()):
            assert torch.equal(a, b)


def test_constant_and_low_precision_input() -> None:
    obs = _observe(HistogramObserver(default_activation_spec()), [torch.zeros(10), torch.zeros(4)])
    scale, zp = obs.calculate_qparams()
    assert float(scale) == torch.finfo(torch.float32).eps and int(zp) == 0
    obs(torch.full((5,), 2.0))  # the point histogram grows into a grid
    assert float(obs.histogram.sum()) == 19
    assert obs.histogram[0] == 14 and obs.histogram[-1] == 5
    assert abs(obs.compute_range()[1] - 2.0) < 1e-3
    half = _observe(MinMaxObserver(default_weight_spec()), [torch.randn(4, 3, dtype=torch.bfloat16)])
    assert half.min_val.dtype == torch.float32


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("spec", [default_activation_spec(), default_weight_spec(),
                                  QuantSpec(observer="mse", granularity="per_channel")])
def test_non_finite_input_names_the_observer(bad: float, spec: QuantSpec) -> None:
    x = torch.randn(4, 8)
    x[2, 3] = bad
    with pytest.raises(CalibrationError, match="'layer2.relu'.*NaN or Inf"):
        make_observer(spec, where="layer2.relu")(x)


def test_no_data_is_a_calibration_error() -> None:
    for spec in (default_activation_spec(), default_weight_spec()):
        obs = make_observer(spec, where="fc")
        obs(torch.empty(0, 3))  # empty tensors add nothing
        with pytest.raises(CalibrationError, match="'fc'.*no data"):
            obs.calculate_qparams()


def test_axis_out_of_range_names_the_ndim() -> None:
    obs = MinMaxObserver(QuantSpec(granularity="per_channel", axis=3), where="fc.weight")
    with pytest.raises(ConfigError, match=r"axis 3 .*ndim=2 at fc\.weight"):
        obs(torch.randn(4, 5))


def test_group_size_must_divide_the_channel() -> None:
    obs = MinMaxObserver(QuantSpec(granularity="per_group", group_size=32))
    with pytest.raises(ConfigError, match="not divisible by group_size=32"):
        obs(torch.randn(8, 27))


def test_channel_count_may_not_change() -> None:
    obs = MinMaxObserver(default_weight_spec(), where="conv1")
    obs(torch.randn(4, 3))
    with pytest.raises(CalibrationError, match="conv1.*shape"):
        obs(torch.randn(5, 3))


def test_integer_input_is_rejected() -> None:
    with pytest.raises(CalibrationError, match="floating-point"):
        MinMaxObserver(QuantSpec())(torch.arange(4))


def test_unsupported_granularity_for_a_class() -> None:
    with pytest.raises(ConfigError, match="per_channel"):
        HistogramObserver(default_weight_spec())
    with pytest.raises(ConfigError, match="fix_range"):
        _observe(HistogramObserver(default_activation_spec()), [torch.rand(3)]).fix_range(0.0, 1.0)


def test_state_written_under_inference_mode_stays_usable() -> None:
    """calibrate runs under inference_mode; observing, merging and loading
    afterwards must still work."""
    for spec in (default_activation_spec(), default_weight_spec()):
        obs = make_observer(spec)
        with torch.inference_mode():
            _observe(obs, [torch.randn(4, 8), torch.randn(4, 8) * 3])
        obs(torch.randn(4, 8) * 0.1)
        obs.merge(_observe(make_observer(spec), [torch.randn(4, 8)]))
        obs.load_state_dict(copy.deepcopy(obs.state_dict()))
        assert int(obs.num_observed) == 4
