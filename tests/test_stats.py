"""Every statistic against numpy/scipy on the same values, and the merge property."""

from __future__ import annotations

import dataclasses
import gc
import math
import weakref

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import nn

import modelcheck
from modelcheck import kernel
from modelcheck.stats import (
    _PIECE_VALUES,
    DEAD_BELOW,
    RESERVOIR_SIZE,
    SAMPLED_ERROR_BOUNDS,
    SAMPLED_MOMENTS_MEASURED,
    SQUARE_RANGE,
    GradientSummary,
    ParameterSummary,
    Sampler,
    StatsCollector,
    TensorSummary,
    _outside_square_range,
    _reshifted_part,
    _sorted,
    _three_axes,
    batch_sample_size,
)

RTOL = 1e-6


@pytest.fixture(params=["kernel", "torch"], autouse=True)
def reduction(request, monkeypatch):
    """Every test here runs twice: float32 activations reduced by the compiled kernel,
    then by PyTorch's operations, which the kernel stands in for."""
    if request.param == "kernel":
        request.getfixturevalue("kernel_built")
    if request.param == "torch":
        monkeypatch.setattr(kernel, "LIBRARY", None)
    return request.param


def summarise(batches, unit_dim=1, sample_size=1 << 16, probe_batches=None, **kwargs):
    summary = TensorSummary(Sampler(sample_size, seed=0, batches=probe_batches), **kwargs)
    for batch in batches:
        summary.update(batch, unit_dim)
    return summary


def reference(values: np.ndarray) -> dict[str, float]:
    flat = values.astype(np.float64).ravel()
    return {
        "mean": flat.mean(),
        "std": flat.std(),
        "rms": math.sqrt(np.mean(flat**2)),
        "min": flat.min(),
        "max": flat.max(),
        "skewness": scipy.stats.skew(flat),
        "kurtosis": scipy.stats.kurtosis(flat),
        "zero_fraction": np.mean(flat == 0),
    }


def assert_matches(dist, values, rtol=RTOL):
    ref = reference(values)
    for key, expected in ref.items():
        assert getattr(dist, key) == pytest.approx(expected, rel=rtol, abs=1e-12), key
    assert dist.count == values.size


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_moments_match_numpy_and_scipy_over_several_batches(dtype):
    gen = torch.Generator().manual_seed(1)
    data = (torch.randn(300, 24, generator=gen, dtype=torch.float64) * 2 + 0.5).to(dtype)
    dist = summarise(data.split(64)).finalize()
    assert_matches(dist, data.double().numpy())


def test_conv_activations_are_summarised_per_channel():
    gen = torch.Generator().manual_seed(2)
    data = torch.randn(10, 6, 5, 5, generator=gen, dtype=torch.float64)
    data[:, 2] += 3.0
    dist = summarise(data.split(4), unit_dim=1).finalize()
    per_channel = data.transpose(0, 1).reshape(6, -1).numpy()
    np.testing.assert_allclose(dist.unit_mean, per_channel.mean(axis=1), rtol=RTOL)
    np.testing.assert_allclose(dist.unit_std, per_channel.std(axis=1), rtol=RTOL)
    assert dist.units == 6
    assert_matches(dist, data.numpy())


def test_sequence_activations_use_the_last_dimension_as_units():
    data = torch.randn(4, 7, 3, dtype=torch.float64)
    dist = summarise([data], unit_dim=2).finalize()
    np.testing.assert_allclose(dist.unit_mean, data.reshape(-1, 3).mean(0).numpy(), rtol=RTOL)


def test_histogram_and_quantiles_match_numpy_when_every_value_is_kept():
    data = torch.randn(500, 8, dtype=torch.float64)
    dist = summarise(data.split(100)).finalize()
    counts, edges = np.histogram(data.numpy().ravel(), bins=50)
    np.testing.assert_allclose(dist.histogram.counts, counts)
    np.testing.assert_allclose(dist.histogram.edges, edges, rtol=1e-12)
    np.testing.assert_allclose(
        dist.quantiles, np.quantile(data.numpy().ravel(), np.linspace(0, 1, 101)), rtol=1e-12
    )
    assert dist.sample_size == data.numel()


def test_many_batches_of_changing_dtype_match_numpy_per_unit():
    # Per-batch results wait in slots and are folded a few batches at a time; a batch of
    # another dtype takes the slow path and new slots. Every unit statistic stays exact.
    gen = torch.Generator().manual_seed(21)
    data = torch.randn(1500, 24, generator=gen, dtype=torch.float64) - 0.2
    batches = [b.float() if i % 11 < 8 else b for i, b in enumerate(data.split(64))]
    values = torch.cat([b.double() for b in batches]).numpy()
    relu = summarise([torch.relu(b) for b in batches], activity=True).finalize()
    np.testing.assert_allclose(relu.unit_mean, np.maximum(values, 0).mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(relu.unit_std, np.maximum(values, 0).std(axis=0), rtol=1e-6)
    np.testing.assert_array_equal(relu.unit_active_fraction, (values > 0).mean(axis=0))
    tanh = summarise([torch.tanh(2 * b) for b in batches], saturation=(-0.9, 0.9)).finalize()
    saturated = (np.abs(np.tanh(2 * values)) >= 0.9).mean(axis=0)
    np.testing.assert_allclose(tanh.unit_saturated_fraction, saturated, rtol=1e-6)
    assert_matches(summarise(batches).finalize(), values)


def test_large_activations_reduced_in_pieces_match_numpy_per_channel():
    # 8 x 16 x 64 x 64 = 524,288 values per batch: each batch is reduced in two pieces.
    gen = torch.Generator().manual_seed(24)
    batches = [torch.randn(8, 16, 64, 64, generator=gen) + 0.1 * c for c in range(3)]
    dist = summarise([torch.relu(b) for b in batches], activity=True).finalize()
    values = torch.relu(torch.cat(batches)).double().numpy()
    per_channel = values.transpose(1, 0, 2, 3).reshape(16, -1)
    np.testing.assert_allclose(dist.unit_mean, per_channel.mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(dist.unit_std, per_channel.std(axis=1), rtol=1e-6)
    np.testing.assert_array_equal(dist.unit_active_fraction, (per_channel > 0).mean(axis=1))
    assert (dist.min, dist.max) == (values.min(), values.max())
    assert dist.count == values.size


@pytest.mark.parametrize("layout", ["transposed", "channels_last"])
def test_strided_activations_are_summarised_in_place_like_contiguous_ones(layout):
    # Attention outputs arrive transposed and channels-last convolutions permuted; both are
    # read where they lie (no copy), and every statistic equals the contiguous tensor's.
    gen = torch.Generator().manual_seed(25)
    if layout == "transposed":  # (batch, sequence, features) made from (sequence, batch, ...)
        batches = [torch.randn(5, 3, 6, generator=gen).relu().transpose(0, 1) for _ in range(3)]
        unit_dim = 2
    else:
        batches = [torch.randn(3, 6, 4, 4, generator=gen).relu() for _ in range(3)]
        batches = [b.contiguous(memory_format=torch.channels_last) for b in batches]
        unit_dim = 1
    assert not batches[0].is_contiguous()
    viewed = _three_axes(batches[0], unit_dim)
    assert viewed.untyped_storage().data_ptr() == batches[0].untyped_storage().data_ptr()
    strided = summarise(batches, unit_dim=unit_dim, activity=True).finalize()
    dense = summarise([b.contiguous() for b in batches], unit_dim, activity=True).finalize()
    values = torch.cat(batches).movedim(unit_dim, -1).reshape(-1, 6).double().numpy()
    np.testing.assert_allclose(strided.unit_mean, values.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(strided.unit_std, dense.unit_std, rtol=1e-6)
    np.testing.assert_array_equal(strided.unit_active_fraction, (values > 0).mean(axis=0))
    assert_matches(strided, values)


def test_a_layer_whose_unit_count_changes_keeps_exact_layer_totals():
    gen = torch.Generator().manual_seed(22)
    batches = [torch.randn(8, 24, generator=gen) for _ in range(11)]
    batches += [torch.randn(8, 12, generator=gen), torch.randn(8, 24, generator=gen)]
    dist = summarise(batches).finalize()
    values = np.concatenate([b.double().numpy().ravel() for b in batches])
    assert dist.units == 1
    assert dist.mean == pytest.approx(values.mean(), rel=1e-6)
    assert dist.std == pytest.approx(values.std(), rel=1e-6)
    assert (dist.min, dist.max) == (values.min(), values.max())


def test_relu_unit_that_never_fires_counts_as_dead():
    data = torch.relu(torch.randn(200, 10, dtype=torch.float64)) + 0.1
    data[:, 3] = 0.0  # never active
    data[1:, 4] = 0.0  # active on 1 of 200 positions: 0.5% < 1%
    data[2:, 5] = 0.0  # active on 2 of 200 = 1%: alive
    dist = summarise(data.split(50), activity=True).finalize()
    active = (data > 0).double().mean(0).numpy()
    np.testing.assert_allclose(dist.unit_active_fraction, active)
    assert dist.dead_fraction == pytest.approx(np.mean(active < DEAD_BELOW))
    assert dist.dead_fraction == pytest.approx(0.2)  # units 3 and 4
    assert dist.zero_fraction == pytest.approx(np.mean(data.numpy() == 0))


def test_saturated_units_of_tanh_are_counted_per_unit():
    z = torch.randn(400, 6, dtype=torch.float64)
    z[:, :2] *= 50  # pushed into the flat region
    y = torch.tanh(z)
    dist = summarise(y.split(128), saturation=(-0.99, 0.99)).finalize()
    flat = (y.abs() >= 0.99).double().mean(0).numpy()
    np.testing.assert_allclose(dist.unit_saturated_fraction, flat)
    assert dist.saturated_fraction == pytest.approx(np.mean(flat >= 0.95))
    assert dist.saturated_value_fraction == pytest.approx((y.abs() >= 0.99).double().mean())


def test_one_sided_saturation_counts_values_at_the_upper_bound():
    y = torch.clamp(torch.randn(100, 3, dtype=torch.float64) * 10, 0, 6)
    dist = summarise([y], saturation=(-math.inf, 6.0), activity=True).finalize()
    np.testing.assert_allclose(dist.unit_saturated_fraction, (y >= 6).double().mean(0).numpy())


def test_constant_layer_has_undefined_shape_moments_not_nan():
    dist = summarise([torch.full((50, 4), 3.0, dtype=torch.float64)]).finalize()
    assert dist.std == 0.0
    assert dist.skewness is None and dist.kurtosis is None
    assert dist.mean == 3.0


def test_tiny_spread_gives_shape_moments_or_none_never_an_error():
    small = torch.tensor([[3e-30], [1e-30], [0.0], [7e-30]], dtype=torch.float64)
    dist = summarise([small]).finalize()
    assert dist.skewness == pytest.approx(scipy.stats.skew(small.numpy().ravel()), rel=1e-9)
    assert dist.kurtosis == pytest.approx(scipy.stats.kurtosis(small.numpy().ravel()), rel=1e-9)
    # Fourth powers of 1e-138 underflow; scipy says nan, we must not raise.
    summarise([torch.tensor([[8.1e-138], [0.0]], dtype=torch.float64)]).finalize()
    rounded = summarise([torch.full((3, 1), 0.1, dtype=torch.float64)]).finalize()
    assert rounded.skewness is None and rounded.kurtosis is None


def test_single_value_is_summarised():
    dist = summarise([torch.tensor([[2.5]], dtype=torch.float64)]).finalize()
    assert (dist.count, dist.mean, dist.std, dist.min, dist.max) == (1, 2.5, 0.0, 2.5, 2.5)
    assert dist.kurtosis is None


def test_half_precision_values_are_accumulated_in_float64():
    data = (torch.randn(256, 16, dtype=torch.float64) * 300).to(torch.float16)
    dist = summarise(data.split(64)).finalize()
    assert_matches(dist, data.double().numpy(), rtol=1e-6)


def test_extreme_magnitudes_keep_exact_extremes_and_scale():
    data = torch.tensor([[1e30, -1e30], [1e-30, 2e-30]], dtype=torch.float64)
    dist = summarise([data]).finalize()
    assert dist.max == 1e30 and dist.min == -1e30
    assert dist.rms == pytest.approx(1e30 / math.sqrt(2), rel=1e-12)


def test_large_batches_estimate_shape_moments_from_a_bounded_sample():
    torch.manual_seed(3)  # Gamma samples from the global generator: seeded, not left to test order
    data = torch.distributions.Gamma(2.0, 1.0).sample((200_000,)).double().reshape(-1, 100)
    summary = summarise(data.split(200), sample_size=4096)  # 10 batches
    dist = summary.finalize()
    ref = reference(data.numpy())
    # Exact where rules decide; estimated (skew 2/sqrt(2)=1.41, kurtosis 3) from 40,960 values.
    assert dist.mean == pytest.approx(ref["mean"], rel=1e-9)
    assert dist.std == pytest.approx(ref["std"], rel=1e-9)
    assert dist.skewness == pytest.approx(ref["skewness"], abs=0.1)
    assert dist.kurtosis == pytest.approx(ref["kurtosis"], abs=0.6)
    assert dist.sample_size == 40_960
    assert summary.reservoir.values.numel() <= 4096


finite_floats = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=64)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    values=arrays(
        np.float64, st.tuples(st.integers(2, 40), st.integers(1, 5)), elements=finite_floats
    ),
    cut=st.floats(0.1, 0.9),
)
def test_merging_two_halves_equals_summarising_the_whole(values, cut):
    split = max(1, min(len(values) - 1, int(len(values) * cut)))
    x = torch.from_numpy(values)
    whole = summarise([x], activity=True).finalize()
    left = summarise([x[:split]], activity=True)
    left.merge(summarise([x[split:]], activity=True))
    merged = left.finalize()
    for key in ("count", "units", "min", "max", "zero_fraction", "dead_fraction"):
        assert getattr(merged, key) == getattr(whole, key), key
    for key in ("mean", "rms"):
        assert getattr(merged, key) == pytest.approx(getattr(whole, key), rel=1e-9, abs=1e-9)
    # std is the root of a variance exact to rounding (~1e-16·mean²): on near-constant
    # data that rounding becomes ~1e-8·|mean| in the std, whichever way the sums were cut.
    scale = max(1.0, abs(whole.mean))
    assert merged.std == pytest.approx(whole.std, rel=1e-9, abs=1e-6 * scale)
    for key in ("skewness", "kurtosis"):
        a, b = getattr(merged, key), getattr(whole, key)
        if b is None or abs(whole.std) < 1e-6 * max(1.0, abs(whole.mean)):
            continue  # near-constant data: shape moments are rounding noise
        assert a == pytest.approx(b, rel=1e-6, abs=1e-6), key
    np.testing.assert_allclose(merged.unit_mean, whole.unit_mean, rtol=1e-9, atol=1e-9)
    assert sorted(merged.quantiles) == pytest.approx(sorted(whole.quantiles))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    values=arrays(np.float64, st.integers(1, 300), elements=finite_floats),
    ties=st.booleans(),
)
def test_quantiles_are_numpys_exactly_when_every_value_is_kept(values, ties):
    if ties:  # repeated values: neighbours of an interpolation are often equal
        values = np.round(values, 0)
    dist = summarise([torch.from_numpy(values).reshape(-1, 1)]).finalize()
    expected = np.quantile(values, np.linspace(0, 1, 101))
    np.testing.assert_array_equal(dist.quantiles, expected)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    values=arrays(np.float64, st.integers(1, 300), elements=finite_floats),
    ties=st.booleans(),
)
def test_histogram_is_numpys_exactly_when_every_value_is_kept(values, ties):
    if ties:  # few distinct values: many of them fall on bin edges
        values = np.round(values / (np.ptp(values) or 1.0) * 10.0)
    dist = summarise([torch.from_numpy(values).reshape(-1, 1)]).finalize()
    counts, edges = np.histogram(values, bins=50)
    np.testing.assert_array_equal(dist.histogram.counts, counts)
    np.testing.assert_array_equal(dist.histogram.edges, edges)


def test_gradient_rms_and_mean_magnitude_match_numpy():
    grads = [torch.randn(30, 7, dtype=torch.float64) * 1e-3 for _ in range(3)]
    summary = GradientSummary(Sampler(1 << 16, seed=0))
    for g in grads:
        summary.update([g])
    stats = summary.finalize()
    flat = torch.cat([g.ravel() for g in grads]).numpy()
    assert stats.rms == pytest.approx(np.sqrt(np.mean(flat**2)), rel=RTOL)
    assert stats.mean_abs == pytest.approx(np.mean(np.abs(flat)), rel=RTOL)
    assert stats.count == flat.size


def test_mean_gradient_magnitude_of_a_large_tensor_is_estimated_from_the_sample():
    gen = torch.Generator().manual_seed(4)
    grads = [torch.randn(1024, 512, generator=gen) * 1e-4 for _ in range(4)]
    summary = GradientSummary(Sampler(16_384, seed=0))
    for g in grads:
        summary.update([g])
    stats = summary.finalize()
    flat = torch.cat([g.ravel() for g in grads]).double().numpy()
    assert stats.rms == pytest.approx(np.sqrt(np.mean(flat**2)), rel=1e-6)  # exact
    assert stats.mean_abs == pytest.approx(np.mean(np.abs(flat)), rel=0.02)  # 4 x 16,384


@pytest.mark.parametrize("offset", [0, 1, 3, 7])
def test_sum_of_squares_of_a_large_gradient_is_float32_exact_wherever_it_lies(offset):
    """One BLAS dot over a million float32 values can be off by 3.6e-6 (MKL on an AMD
    EPYC), depending on where in memory the values start; the gradient's rms must not."""
    gen = torch.Generator().manual_seed(offset)
    buffer = torch.randn(2_000_000 + 8, generator=gen) * 1e-4
    g = buffer[offset : offset + 2_000_000].view(2000, 1000)
    summary = GradientSummary()
    summary.update([g])
    values = g.double().numpy()
    assert summary.finalize().rms == pytest.approx(np.sqrt((values**2).mean()), rel=3e-7)


def test_parameter_summary_matches_numpy_and_counts_fan_in_like_torch():
    torch.manual_seed(23)
    conv = torch.nn.Conv2d(3, 8, kernel_size=(3, 5))
    stats = ParameterSummary("weight", conv.weight).finalize()
    w = conv.weight.detach().double().numpy()
    assert stats.std == pytest.approx(w.std(), rel=1e-6)
    # A mean near zero is good to float32 rounding of the spread, not of itself.
    assert stats.mean == pytest.approx(w.mean(), abs=1e-6 * w.std())
    expected_fan_in, _ = torch.nn.init._calculate_fan_in_and_fan_out(conv.weight)
    assert stats.fan_in == expected_fan_in == 45
    assert ParameterSummary("bias", conv.bias).finalize().fan_in is None


@pytest.mark.parametrize("shape", [(1024, 768), (300_001,), (64, 3, 7, 7)])
def test_parameter_summary_of_any_shape_matches_numpy(shape):
    # Large enough for the kernel's threads, one long row, and rows of a conv weight.
    gen = torch.Generator().manual_seed(24)
    p = 0.5 + 0.02 * torch.randn(shape, generator=gen)  # a mean far from zero
    stats = ParameterSummary("weight", p).finalize()
    w = p.double().numpy()
    assert stats.std == pytest.approx(w.std(), rel=1e-6)
    assert stats.mean == pytest.approx(w.mean(), rel=1e-7)
    assert (stats.min, stats.max) == (w.min(), w.max())


def test_nonfinite_values_raise_the_flag_without_a_count_pass():
    data = torch.randn(20, 4, dtype=torch.float64)
    data[3, 1] = math.nan
    summary = summarise([data])
    assert bool(summary.finite_flag())
    assert not bool(summarise([torch.randn(20, 4)]).finite_flag())


# -- sampled estimates: the bound README.md and the report state, against exact values -------


def _sampled_cases():
    gen = torch.Generator().manual_seed(11)
    shape = (12, 128, 256)  # 12 batches of 32,768 values, sampled 8,192 per batch
    normal = torch.randn(shape, generator=gen, dtype=torch.float64)
    yield "normal", normal
    yield "relu", torch.relu(normal + 0.3)
    yield "gamma", torch.distributions.Gamma(2.0, 1.0).sample(shape).double()
    yield "saturated-tanh", torch.tanh(3 * normal)


def _rank_error(sorted_values: np.ndarray, estimates, targets) -> float:
    """How far (in fraction of values) each estimated quantile is from its target rank."""
    low = np.searchsorted(sorted_values, estimates, side="left") / sorted_values.size
    high = np.searchsorted(sorted_values, estimates, side="right") / sorted_values.size
    return float(np.max(np.maximum(0, np.maximum(low - targets, targets - high))))


@pytest.mark.parametrize("probe_batches", [None, 12])
@pytest.mark.parametrize("name", ["normal", "relu", "gamma", "saturated-tanh"])
def test_sampled_estimates_stay_within_the_stated_error_bound(name, probe_batches):
    # A probe of known length offers the reservoir its share per batch: none chosen by keys.
    torch.manual_seed(12)  # Gamma samples from the global generator
    data = dict(_sampled_cases())[name]
    dist = summarise(data, 1, 8192, probe_batches).finalize()
    flat = data.numpy().ravel()
    assert dist.sample_size == SAMPLED_MOMENTS_MEASURED == 12 * 8192 < flat.size
    assert dist.histogram_sample_size == RESERVOIR_SIZE
    assert abs(dist.skewness - scipy.stats.skew(flat)) < SAMPLED_ERROR_BOUNDS["skewness"]
    assert abs(dist.kurtosis - scipy.stats.kurtosis(flat)) < SAMPLED_ERROR_BOUNDS["kurtosis"]
    targets = np.linspace(0, 1, len(dist.quantiles))
    assert (
        _rank_error(np.sort(flat), dist.quantiles, targets) < SAMPLED_ERROR_BOUNDS["quantile_rank"]
    )
    exact, _ = np.histogram(flat, bins=np.array(dist.histogram.edges))
    tv = 0.5 * np.abs(np.array(dist.histogram.counts) - exact).sum() / flat.size
    assert tv < SAMPLED_ERROR_BOUNDS["histogram_tv"]
    # What rules decide on stays exact however much is sampled.
    assert dist.mean == pytest.approx(flat.mean(), rel=1e-9, abs=1e-12)
    assert dist.std == pytest.approx(flat.std(), rel=1e-9)
    assert dist.zero_fraction == pytest.approx(np.mean(flat == 0), abs=0.01)


# -- the hot path's own promises ----------------------------------------------------------------


def test_values_far_from_zero_keep_their_spread_exactly():
    # sum(x²) - sum(x)²/n would lose every digit of this spread to cancellation.
    gen = torch.Generator().manual_seed(4)
    data = (1e4 + 1e-3 * torch.randn(400, 6, generator=gen, dtype=torch.float64)).split(100)
    dist = summarise(data).finalize()
    flat = torch.cat(data).numpy()
    np.testing.assert_allclose(dist.unit_std, flat.std(axis=0), rtol=1e-6)
    assert dist.std == pytest.approx(flat.std(), rel=1e-6)


def test_a_collapsed_float32_layer_has_exactly_zero_spread():
    data = torch.full((64, 10), 0.7310586, dtype=torch.float32)  # sigmoid(1), everywhere
    dist = summarise(data.split(16)).finalize()
    assert dist.std == 0.0
    assert max(dist.unit_std) == 0.0


def test_sampled_positions_are_uniform_in_any_prefix_and_ascending_for_the_kernel():
    n, size = 1_000, 200_000  # ~200 draws per range of positions
    sampler = Sampler(size, seed=3)
    values = torch.arange(n * 1_000, dtype=torch.float64)  # a value names its position
    positions = (sampler.take(values)[0].long() // 1_000).numpy()  # n equal ranges
    for part in (positions, positions[: size // 10]):  # the reservoir takes a prefix
        counts = np.bincount(part, minlength=n)
        assert scipy.stats.chisquare(counts).pvalue > 1e-3
    ascending, places, out, weight = sampler.for_kernel(values.reshape(1, 1, -1))
    assert bool((ascending[1:] >= ascending[:-1]).all()) and int(ascending[-1]) < n * 1_000
    out[places] = values[ascending]  # what the kernel writes, as take gathers it
    assert torch.equal(out, sampler.take(values)[0]) and weight == n * 1_000 / size


def test_a_sample_sorts_as_numpy_sorts_it_in_float32_or_not():
    gen = np.random.default_rng(4)
    narrow = gen.standard_normal(4096).astype(np.float32).astype(np.float64)
    narrow[:3] = [-0.0, 1e-40, -3.4e38]  # a signed zero, a float32 subnormal, the range's end
    wide = narrow + 1e-12  # values float32 cannot hold: sorted in float64
    for values in (narrow, wide):
        np.testing.assert_array_equal(_sorted(values), np.sort(values))
        assert _sorted(values).dtype == np.float64


def test_a_long_probe_samples_fewer_values_per_batch_in_the_same_total():
    assert batch_sample_size(16_384, None) == 16_384  # a stream of unknown length
    assert batch_sample_size(16_384, 16) == 16_384
    assert batch_sample_size(16_384, 128) == 2_048
    assert batch_sample_size(16_384, 10_000) == 1_024  # never below a useful minimum
    assert batch_sample_size(512, 10_000) == 512  # nor above what was asked for


def test_state_does_not_grow_with_the_number_of_batches():
    summary = TensorSummary(Sampler(1024, seed=0), activity=True)
    gen = torch.Generator().manual_seed(6)
    sizes = []
    for _ in range(60):
        summary.update(torch.relu(torch.randn(64, 128, generator=gen)), 1)
        held = sum(s.numel() for s, _ in summary._pending)
        sizes.append(held + summary.reservoir.values.numel())
    assert max(sizes) <= 16_384 + 5 * 4096  # waiting samples + a reservoir before its cut
    assert summary.unit_sum.numel() == 128
    assert summary.moments.sums.numel() == 4


def test_a_known_probe_fills_the_reservoir_from_many_positions_in_proportion_to_batches():
    # Every batch samples the same positions; each offers a run after the last one's, so
    # the reservoir holds thousands of positions, not one batch's share of them again.
    # A batch of a third the rows gets a third of a full batch's share.
    x = torch.arange(64 * 512 * 4, dtype=torch.float32).reshape(64, 512, 4)  # value: position
    batches = [x + 1e6 * b for b in range(11)] + [x[:21] + 11e6]
    summary = summarise(batches, 1, 8192, probe_batches=12)
    dist = summary.finalize()
    held = summary.reservoir.values.numpy()
    positions, batch = np.unique(held % 1e6).size, held // 1e6
    assert held.size == dist.histogram_sample_size == 4096 * (11 * 64 + 21) // (12 * 64)
    assert positions > 3_500  # of 8,192 sampled; 341 if each batch offered the same run
    assert np.count_nonzero(batch == 11) == pytest.approx(4096 / 12 * 21 / 64, abs=1)


def test_a_long_probe_keeps_few_tensors_in_its_reservoir():
    # Each batch of a 2,000-batch probe offers the reservoir a handful of values; held as
    # thousands of small tensors they fragmented the heap (+50% peak memory at 100k samples).
    summary = TensorSummary(Sampler(1024, seed=0, batches=2000))
    gen = torch.Generator().manual_seed(7)
    held = []
    for _ in range(600):
        summary.update(torch.randn(16, 64, generator=gen), 1)
        held.append(len(summary.reservoir._pieces))
    assert max(held) <= 9
    summary.flush()
    assert summary.reservoir.values.numel() == 4096 * 600 // 2000  # its share of 600 batches


def test_output_gradients_keep_only_their_sum_of_squares():
    summary = GradientSummary()
    summary.update([torch.full((5, 3), -2.0, dtype=torch.float64)])
    stats = summary.finalize()
    assert stats.rms == 2.0
    assert stats.mean_abs is None


def test_parameter_with_a_nan_counts_it_and_has_no_spread():
    p = torch.ones(4, 5)
    p[1, 2] = math.nan
    stats = ParameterSummary("weight", p).finalize()
    assert stats.nonfinite == 1
    assert math.isnan(stats.std)


# -- whether float32 squares held the values: every summary of a device at once ----------------


def _largest_finite(values: np.ndarray) -> float:
    finite = np.abs(values[np.isfinite(values)])
    return float(finite.max()) if finite.size else 0.0


def test_square_terms_of_many_activation_summaries_are_each_their_own():
    """Per-unit sums of summaries with 1 to 9 units, added up by index in one go, must
    land on their own summary; extremes that are infinite do not count as the largest.
    Out of float32's range (the 2nd and 3rd) only the largest magnitude is exact."""
    gen = torch.Generator().manual_seed(27)
    cases = [(3, 1.0, 0.0), (9, 1e-20, 0.0), (1, 2.0, -1e19), (5, 1e3, 0.5), (2, 1.0, 0.0)]
    batches = [torch.randn(16, u, generator=gen) * scale + at for u, scale, at in cases]
    batches[4][3, 1] = -math.inf
    summaries = [summarise([b, b * 0.5]) for b in batches]

    terms = TensorSummary.square_terms(summaries)

    assert terms.shape == (3, len(cases)) and terms.dtype == torch.float64
    flagged = _outside_square_range(*terms).tolist()
    assert flagged == [False, True, True, False, False]  # below 1e-18, above 1e18
    for column, summary, batch, out in zip(terms.T.tolist(), summaries, batches, flagged):
        values = torch.cat([batch, batch * 0.5]).double().numpy()
        assert column[0] == _largest_finite(values)
        if not out and np.isfinite(values).all():
            shift = summary.unit_shift.double().numpy()
            expected = (((values - shift) ** 2).sum(), values.sum())
            assert column[1:] == pytest.approx(expected, rel=1e-6)


def test_square_terms_of_parameters_and_gradients_are_each_their_own():
    gen = torch.Generator().manual_seed(28)
    weights = [torch.randn(4, 3, generator=gen) * s + 2.0 for s in (1.0, 1e-3, 1e25, 1.0)]
    weights[3][1, 1] = -1e19  # the largest magnitude is the minimum; its square still fits
    grads = [torch.randn(6, 2, generator=gen) * s for s in (1.0, 1e-25, 3.0)]
    parameters = [ParameterSummary("weight", w) for w in weights]
    sampler = Sampler(1 << 16, seed=0)
    gradients = [GradientSummary(sampler), GradientSummary(sampler), GradientSummary()]
    for summary, g in zip(gradients, grads):
        summary.update([g])

    weight_terms = ParameterSummary.square_terms(parameters)
    grad_terms = GradientSummary.square_terms(gradients)

    assert weight_terms.shape == (3, 4) and grad_terms.shape == (3, 3)
    # Weights of 2 ± 1e25 square to 1e50; one of -1e19 is beyond 1e18. Gradients of
    # 1e-25 square to 1e-50, 0 in float32: their mean magnitude, kept for parameter
    # gradients, shows them.
    assert _outside_square_range(*weight_terms).tolist() == [False, False, True, True]
    assert weight_terms[0, 3] == -float(weights[3][1, 1])
    assert _outside_square_range(*grad_terms).tolist() == [False, True, False]
    for column, w in zip(weight_terms.T.tolist()[:2], weights):
        d = w.double().numpy().ravel() - float(w.reshape(-1)[0])
        expected = (_largest_finite(w.double().numpy()), (d**2).sum(), d.sum())
        assert column == pytest.approx(expected, rel=1e-5)
    assert grad_terms[0, 1] == pytest.approx(np.abs(grads[1].double().numpy()).mean(), rel=1e-6)
    for column, g, kept in zip(grad_terms.T.tolist()[::2], grads[::2], (True, False)):
        values = g.double().numpy()
        total = np.abs(values).sum() if kept else 0.0  # output gradients keep no magnitude
        expected = (np.sqrt((values**2).mean()), (values**2).sum(), total)
        assert column == pytest.approx(expected, rel=1e-6)
    assert SQUARE_RANGE == (1e-18, 1e18)  # the bounds the cases above straddle


def test_batches_after_the_shift_is_replaced_are_reduced_around_the_new_one():
    # A distributed merge re-centres a summary's sums on the ranks' common mean and gives
    # it a new shift tensor: later batches must square their deviations from that one.
    gen = torch.Generator().manual_seed(26)
    batches = [torch.randn(32, 8, generator=gen) + 3.0 for _ in range(4)]
    summary = summarise(batches[:2])
    summary._fold()  # the waiting per-unit results into the sums being re-centred
    recentred = _reshifted_part(summary._state(), summary.unit_shift - 2.0)
    summary.unit_dsumsq, summary.unit_shift = recentred["dsumsq"], recentred["shift"].clone()
    for batch in batches[2:]:
        summary.update(batch, 1)
    values = torch.cat(batches).double().numpy()
    np.testing.assert_allclose(summary.finalize().unit_std, values.std(axis=0), rtol=1e-6)


@pytest.mark.parametrize("reduction", ["torch"], indirect=True)  # its workspaces
def test_a_workspace_that_grows_lets_the_smaller_buffer_go():
    # Views of the shared workspace are kept with it, not by the summaries: when a larger
    # activation needs a larger buffer, nothing holds on to the smaller one.
    gen = torch.Generator().manual_seed(27)
    scratch: dict = {}
    small, large = (TensorSummary(Sampler(), scratch=scratch) for _ in range(2))
    batches = [torch.randn(4, 1000, generator=gen) + 1.0 for _ in range(2)]
    small.update(batches[0], 1)
    buffer = weakref.ref(scratch[("", torch.float32, torch.device("cpu"))])
    large.update(torch.randn(4, 5000, generator=gen), 1)
    gc.collect()
    assert buffer() is None
    small.update(batches[1], 1)  # now through a view of the larger buffer
    values = torch.cat(batches).double().numpy()
    np.testing.assert_allclose(small.finalize().unit_std, values.std(axis=0), rtol=1e-6)


@pytest.mark.parametrize("reduction", ["torch"], indirect=True)  # its workspaces
def test_workspace_views_do_not_pile_up_when_every_batch_has_another_shape():
    scratch: dict = {}
    summary = TensorSummary(Sampler(), scratch=scratch)
    for length in range(199, 0, -1):  # a sequence model fed batches of every length
        summary.update(torch.randn(2, length, 8), 2)
    views = scratch[("views", "", torch.float32, torch.device("cpu"))]
    assert 0 < len(views) <= 64
    assert summary.finalize().count == 2 * 8 * sum(range(1, 200))


def test_summary_does_not_keep_a_view_of_a_tensor_the_model_overwrites():
    x = torch.randn(8, 4, dtype=torch.float64)
    expected = x.clone()
    summary = summarise([x])
    x.fill_(1e6)  # an in-place ReLU after the hook does this to the recorded output
    dist = summary.finalize()
    assert dist.max == pytest.approx(float(expected.max()))
    assert max(dist.quantiles) == pytest.approx(float(expected.max()))


# -- a tensor summarised twice (an eval-mode Dropout returns its input itself) -----------


def _layer_statistics(report) -> list[dict]:
    return [dataclasses.asdict(layer.activation) for layer in report.layers]


@pytest.fixture
def copies(monkeypatch) -> list[bool]:
    """Records whether each summary offered another's results took them."""
    seen: list[bool] = []
    copied_from = TensorSummary._copied_from

    def spy(self, source, x3):
        seen.append(copied_from(self, source, x3))
        return seen[-1]

    monkeypatch.setattr(TensorSummary, "_copied_from", spy)
    return seen


@pytest.mark.parametrize("reduction", ["torch"], indirect=True)  # float64: never the kernel
@pytest.mark.parametrize("piece_values", [_PIECE_VALUES, 64])
def test_a_layer_returning_its_input_copies_the_results_of_the_layer_before(
    monkeypatch, copies, piece_values
):
    # 64 values a piece cuts each 40x32 batch into 20 pieces: more than the slots' usual 8.
    monkeypatch.setattr("modelcheck.stats._PIECE_VALUES", piece_values)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Dropout(0.5), nn.Identity()).double()
    x = torch.randn(200, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    report = modelcheck.check(model, x, batch_size=40)
    assert copies == [True] * 10  # the Dropout and the Identity, five batches each
    with torch.no_grad():
        relu = model.eval()[1](model[0](x)).numpy()
    for name in ("2", "3"):
        dropout = report.layer(name).activation
        assert dropout.count == relu.size
        assert dropout.mean == pytest.approx(relu.mean(), rel=1e-12)
        assert dropout.std == pytest.approx(relu.std(), rel=1e-12)
        assert dropout.min == relu.min() == 0
        assert dropout.max == pytest.approx(relu.max(), rel=1e-15)
        assert dropout.zero_fraction == pytest.approx((relu == 0).mean())
    monkeypatch.setattr(StatsCollector, "_summarised_as_is", lambda *_: None)
    np.testing.assert_equal(
        _layer_statistics(report), _layer_statistics(modelcheck.check(model, x, batch_size=40))
    )


@pytest.mark.parametrize("reduction", ["kernel"], indirect=True)
def test_the_kernels_results_for_a_batch_are_added_again_for_the_same_tensor(monkeypatch, copies):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Dropout(0.5), nn.Identity())
    x = torch.randn(200, 6, generator=torch.Generator().manual_seed(1))
    report = modelcheck.check(model, x, batch_size=40)
    assert copies == [True] * 10  # the Dropout and the Identity, five batches each
    statistics = _layer_statistics(report)
    assert statistics[2] == statistics[3]
    for key in ("count", "mean", "std", "min", "max", "skewness", "kurtosis"):
        assert statistics[2][key] == statistics[1][key]  # as the ReLU's summary has them
    monkeypatch.setattr(StatsCollector, "_summarised_as_is", lambda *_: None)
    np.testing.assert_equal(
        statistics, _layer_statistics(modelcheck.check(model, x, batch_size=40))
    )


class _CalledTwice(nn.Module):
    """A Linear called again between a layer that returns its first output and another."""

    def __init__(self) -> None:
        super().__init__()
        self.linear, self.first, self.second = nn.Linear(6, 32), nn.Identity(), nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept = self.first(self.linear(x))
        self.linear(x * 3)
        return self.second(kept)  # the first output again, copied from `first`'s results


def test_copied_results_stay_those_of_their_batch_when_the_source_runs_again(monkeypatch, copies):
    torch.manual_seed(0)
    model = _CalledTwice()
    x = torch.randn(200, 6, generator=torch.Generator().manual_seed(1))
    report = modelcheck.check(model, x, batch_size=40)
    assert copies == [True, True] * 5
    statistics = {layer.name: dataclasses.asdict(layer.activation) for layer in report.layers}
    assert statistics["second"] == statistics["first"]
    monkeypatch.setattr(StatsCollector, "_summarised_as_is", lambda *_: None)
    again = modelcheck.check(model, x, batch_size=40)
    np.testing.assert_equal(_layer_statistics(report), _layer_statistics(again))


def test_a_tensor_changed_in_place_after_its_summary_is_summarised_again(copies):
    # Identity returns the Linear's output; the in-place ReLU then changes that very tensor.
    model = nn.Sequential(nn.Linear(6, 32), nn.Identity(), nn.ReLU(inplace=True)).double()
    x = torch.randn(120, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    report = modelcheck.check(model, x, batch_size=40)
    with torch.no_grad():
        linear = model[0](x).numpy()
    assert report.layer("1").activation.min == pytest.approx(linear.min())
    assert report.layer("2").activation.min == 0.0
    assert report.layer("2").activation.mean == pytest.approx(np.maximum(linear, 0).mean())
    assert copies == [True] * 3  # only the Identity copied


class _FirstThenSecond(nn.Module):
    """Returns, through an Identity, branch ``a``'s output on its first call and branch
    ``b``'s after: the Identity repeats a tensor of another summary, around another shift."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.pick = nn.Linear(6, 16), nn.Linear(6, 16), nn.Identity()
        nn.init.constant_(self.b.bias, 5.0)  # b's values, and so its shift, sit far from a's
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        a, b = self.a(x), self.b(x)
        return self.pick(a if self.calls == 1 else b)


def test_a_layer_repeating_a_different_layers_tensor_than_at_first_reduces_it_itself(copies):
    torch.manual_seed(0)
    model = _FirstThenSecond().double()
    x = torch.randn(120, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    report = modelcheck.check(model, x, batch_size=40, gradients=False)
    with torch.no_grad():
        picked = torch.cat([model.a(x[:40]), model.b(x[40:])]).numpy()
    pick = report.layer("pick").activation
    assert pick.mean == pytest.approx(picked.mean(), rel=1e-12)
    assert pick.std == pytest.approx(picked.std(), rel=1e-12)
    assert copies == [True, False, False]
