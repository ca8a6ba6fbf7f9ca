"""The compiled one-pass reduction against numpy on the same values, and a check that
uses it against one that does not."""

from __future__ import annotations

import ctypes
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import modelcheck
from modelcheck import kernel

SATURATIONS = [None, (-0.99, 0.99), (0.005, 0.995), (-math.inf, 6.0), (-2.0, 1.0)]


pytestmark = pytest.mark.usefixtures("kernel_built")


def reduced(x3: torch.Tensor, shift: torch.Tensor, saturation=None, sample=None, into=None):
    """The kernel's results for x3, added to ``into`` (accumulators from ``accumulators``)
    or to fresh ones; also checks that its batch buffer holds what one batch added."""
    units = x3.shape[1]
    sums, extremes = into if into is not None else accumulators(units)
    before = sums.clone(), extremes.clone()
    kept = [sums[0], sums[1], sums[2], sums[3] if saturation else None]  # as in a summary
    totals = [None if t is None else t.data_ptr() for t in kept]
    totals += [extremes[0:1].data_ptr(), extremes[1:2].data_ptr()]
    batch = torch.full((4 * units + 2,), math.nan, dtype=torch.float64)
    kernel.reduce_into(x3, shift, totals, kernel.saturation_test(saturation), batch, sample)
    rows = 4 if saturation else 3
    added = batch[: 4 * units].view(4, units)[:rows] + before[0][:rows]
    torch.testing.assert_close(added, sums[:rows], rtol=0, atol=0, equal_nan=True)
    low, high = batch[4 * units :]
    both = torch.stack([low.minimum(before[1][0]), high.maximum(before[1][1])])
    torch.testing.assert_close(extremes, both, rtol=0, atol=0, equal_nan=True)
    saturated = sums[3].numpy() if saturation else np.zeros(0)
    return [sums[0].numpy(), sums[1].numpy(), *extremes.numpy(), sums[2].numpy(), saturated]


def accumulators(units: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A summary's float64 accumulators as they start: zero sums, extremes at ±inf."""
    return torch.zeros(4, units, dtype=torch.float64), torch.tensor(
        [math.inf, -math.inf], dtype=torch.float64
    )


def expected(x3: torch.Tensor, shift: torch.Tensor, saturation=None) -> list[np.ndarray]:
    x = x3.numpy().transpose(1, 0, 2).reshape(x3.shape[1], -1)  # (units, positions)
    deviations = (x - shift.numpy()[:, None]).astype(np.float64)  # as float32 subtracts
    low, high = saturation or (0.0, 0.0)
    if saturation is None:
        saturated = np.ones((0, 1))
    elif math.isinf(low):
        saturated = x >= np.float32(high)
    else:
        saturated = np.abs(x - np.float32((high + low) / 2)) >= np.float32((high - low) / 2)
    x = x.astype(np.float64)
    return [
        x.sum(1),
        (deviations**2).sum(1),
        np.array(x.min()),
        np.array(x.max()),
        (x > 0).sum(1),
        saturated.sum(1),
    ]


def assert_agree(got, want, x3):
    unit_sum, unit_dsumsq, low, high, active, saturated = got
    scale = np.abs(x3.double().numpy()).transpose(1, 0, 2).reshape(x3.shape[1], -1).sum(1)
    assert np.all(np.abs(unit_sum - want[0]) <= 1e-6 * scale + 1e-30)
    np.testing.assert_allclose(unit_dsumsq, want[1], rtol=1e-6, atol=1e-30)
    assert (low, high) == (want[2], want[3])  # extremes are exact
    np.testing.assert_array_equal(active, want[4])  # so are counts
    np.testing.assert_array_equal(saturated, want[5])


shapes = st.tuples(st.integers(1, 40), st.integers(1, 24), st.integers(1, 70))


@settings(max_examples=150, deadline=None)
@given(
    shape=shapes,
    seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from([1e-3, 1.0, 3.0, 1e3]),
    saturation=st.sampled_from(SATURATIONS),
)
def test_the_kernel_agrees_with_numpy(shape, seed, scale, saturation):
    gen = torch.Generator().manual_seed(seed)
    x3 = torch.randn(shape, generator=gen) * scale
    x3[torch.rand(shape, generator=gen) < 0.2] = 0.0  # exact zeros: neither positive nor not
    x3[torch.rand(shape, generator=gen) < 0.1] = 6.0  # exactly at a saturation bound
    shift = x3[:1].mean((0, 2))
    assert_agree(reduced(x3, shift, saturation), expected(x3, shift, saturation), x3)


@pytest.mark.parametrize("shape", [(3000, 700, 1), (16, 64, 1200)], ids=["rows", "runs"])
def test_large_activations_agree_with_numpy(shape):
    x3 = torch.randn(shape, generator=torch.Generator().manual_seed(1)).relu_() + 0.25
    shift = x3[:2].mean((0, 2))
    assert_agree(reduced(x3, shift), expected(x3, shift), x3)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(
    "shape", [(3001, 700, 1), (4099, 64, 2), (17, 64, 1200), (1, 300, 1000)],
    ids=["rows", "rows-of-pairs", "runs", "one-row"],
)  # fmt: skip
def test_each_thread_count_agrees_with_numpy(shape, threads, monkeypatch):
    # Split by outer rows (one row: a single thread), the parts added up in order, each
    # part copying the sample's values that fall in its rows.
    monkeypatch.setattr(kernel, "THREADED", True)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(threads)
        x3 = torch.randn(shape, generator=gen) - 0.5
        x3[-1, 0, -1] = -40.0  # the extremes in the last part
        x3[-1, -1, 0] = 40.0
        shift = x3[:1].mean((0, 2))
        saturation = (-math.inf, 1.5)
        positions = torch.randint(x3.numel(), (5000,), generator=gen)
        positions[:3] = torch.tensor([0, x3.numel() - 1, positions[3]])  # both ends; a repeat
        sample = (*positions.sort(), torch.full((5000,), math.nan))
        want = expected(x3, shift, saturation)
        assert_agree(reduced(x3, shift, saturation, sample), want, x3)
        assert torch.equal(sample[2], x3.reshape(-1)[positions])
    finally:
        torch.set_num_threads(before)


def test_batches_add_up_in_a_summarys_accumulators():
    gen = torch.Generator().manual_seed(3)
    first, second = torch.randn(9, 5, 3, generator=gen), torch.randn(4, 5, 3, generator=gen) * 3
    shift, saturation, into = first.mean((0, 2)), (-1.0, 1.0), accumulators(5)
    reduced(first, shift, saturation, into=into)
    got = reduced(second, shift, saturation, into=into)
    both = torch.cat([first, second])
    assert_agree(got, expected(both, shift, saturation), both)
    second[2, 1, 0] = math.nan  # from here on the extremes are NaN, as torch.minimum keeps them
    reduced(second, shift, into=into)
    got = reduced(first, shift, into=into)
    assert np.isnan(got[2]) and np.isnan(got[3])


class FakeLibrary:
    def __init__(self, threaded: int, function) -> None:
        self.modelcheck_kernel_threaded = lambda: threaded
        self.omp_get_max_threads = function


def test_threads_are_used_only_on_pytorchs_own_openmp_runtime():
    torch_runtime = ctypes.CDLL(torch._C.__file__).omp_get_max_threads
    assert kernel._shares_torch_threads(FakeLibrary(1, torch_runtime))
    assert not kernel._shares_torch_threads(FakeLibrary(0, torch_runtime))  # no OpenMP
    # A runtime of its own (here any other function): its threads would compete with PyTorch's.
    assert not kernel._shares_torch_threads(FakeLibrary(1, ctypes.CDLL(None).abs))
    assert not kernel._shares_torch_threads(None)


def test_the_kernel_runs_on_pytorchs_threads():
    # Built with OpenMP and loaded after PyTorch, the kernel gets PyTorch's libgomp.so.1 from
    # the dynamic linker, even with scikit-learn's own runtime loaded too.
    import sklearn.cluster  # noqa: F401  (brings scikit-learn's libgomp)

    assert "OpenMP" in torch.__config__.parallel_info()
    assert kernel.LIBRARY.modelcheck_kernel_threaded()
    assert kernel._shares_torch_threads(kernel.LIBRARY)
    assert kernel.THREADED


@pytest.mark.parametrize("inner", [1, 5])
@pytest.mark.parametrize("outer", [6, 19])  # rows one by one; blocks of eight, then the rest
def test_a_nan_makes_both_extremes_nan_as_torch_aminmax_does(outer, inner):
    x3 = torch.randn(outer, 4, inner)
    x3[min(7, outer - 1), 2, 0] = math.nan  # the last row of a block, where there are blocks
    x3[1, 1, 0] = math.inf
    got = reduced(x3, torch.zeros(4))
    assert np.isnan(got[2]) and np.isnan(got[3])
    assert all(math.isnan(v) for v in torch.aminmax(x3))
    assert np.isnan(got[0][2]) and np.isinf(got[0][1]) and np.isfinite(got[0][[0, 3]]).all()


@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(0, 3000),
    seed=st.integers(0, 2**31 - 1),
    centre=st.sampled_from([0.0, 1.0, -1e3]),
    zeros=st.floats(0.0, 1.0),
)
def test_power_sums_agree_with_numpy(n, seed, centre, zeros):
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(n, generator=gen) + centre
    values[torch.rand(n, generator=gen) < zeros] = 0.0
    shift = float(values[:5].double().mean()) if n else 0.0
    sums, nonzero = torch.ones(4, dtype=torch.float64), torch.tensor(7)  # added to
    kernel.add_power_sums(values, shift, sums, nonzero)
    d = values.double().numpy() - shift
    want = [1.0 + np.sum(d**k) for k in range(1, 5)]
    np.testing.assert_allclose(sums.numpy(), want, rtol=1e-12, atol=1e-9 * (1 + abs(centre)) ** 4)
    assert int(nonzero) == 7 + np.count_nonzero(values.numpy())


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_parameters_in_one_call_agree_with_numpy(threads, monkeypatch):
    # Sizes on both sides of the kernel's 65,536-value blocks, one value, a mean far from
    # zero; blocks of every parameter shared between threads, each added up in order.
    monkeypatch.setattr(kernel, "THREADED", True)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(threads)
        sizes = [1, 7, 65_536, 65_537, 300_000]
        parameters = [torch.randn(n, generator=gen) * 0.01 + 3.0 for n in sizes]
        parameters[3][-1] = 9.0  # the maximum in a parameter's last block
        got = kernel.parameter_values(parameters).numpy()
    finally:
        torch.set_num_threads(before)
    for row, p in zip(got, parameters):
        x = p.double().numpy()
        d = x - x[0]
        assert row[0] == x[0] and (row[3], row[4]) == (x.min(), x.max())
        np.testing.assert_allclose(row[1:3], [d.sum(), (d * d).sum()], rtol=1e-6, atol=1e-9)


def test_a_nan_in_a_parameter_makes_its_extremes_nan_and_no_others():
    parameters = [torch.randn(70_000), torch.randn(70_000), torch.randn(5)]
    parameters[0][66_000] = math.nan  # in its second block
    parameters[1][3] = math.inf
    got = kernel.parameter_values(parameters).numpy()
    assert np.isnan(got[0, 1:]).all()
    assert np.isinf(got[1, 1:3]).all() and got[1, 4] == math.inf and np.isfinite(got[1, 3])
    assert np.isfinite(got[2]).all()


def test_it_takes_contiguous_float32_cpu_tensors_only():
    x = torch.randn(4, 3, 2)
    assert kernel.accepts(x)
    assert not kernel.accepts(x.double())
    assert not kernel.accepts(x.half())
    assert not kernel.accepts(x.transpose(0, 2))


def statistics(report):
    fields = ("mean", "std", "min", "max", "zero_fraction", "unit_mean", "unit_std")
    fields += ("skewness", "kurtosis", "quantiles")  # from the sample, which the kernel copies
    fields += ("unit_active_fraction", "unit_saturated_fraction", "saturated_value_fraction")
    return {layer.name: [getattr(layer.activation, f) for f in fields] for layer in report.layers}


def test_a_check_with_the_kernel_equals_one_without(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Tanh(), nn.Flatten(),
        nn.Linear(8 * 12 * 12, 32), nn.ReLU6(), nn.Linear(32, 16), nn.Sigmoid(),
    )  # fmt: skip
    with torch.no_grad():
        model[2].weight.mul_(1000)  # pins tanh units at ±1
        model[5].bias[:16] = -20.0  # and kills half the ReLU6 units
    x = torch.randn(96, 3, 16, 16)
    with_kernel = modelcheck.check(model, x, batch_size=32)
    monkeypatch.setattr(kernel, "LIBRARY", None)
    without = modelcheck.check(model, x, batch_size=32)
    assert [f.code for f in with_kernel.findings] == [f.code for f in without.findings]
    assert {"MC101", "MC102"} <= {f.code for f in with_kernel.findings}
    ours, theirs = statistics(with_kernel), statistics(without)
    assert ours.keys() == theirs.keys()
    for name in ours:
        for got, want in zip(ours[name], theirs[name]):
            assert (got is None) == (want is None), name
            if got is not None:
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=name)


def test_a_library_of_another_version_is_not_called(monkeypatch):
    monkeypatch.setattr(kernel, "_VERSION", kernel._VERSION + 1)
    assert kernel._load() is None
    monkeypatch.undo()
    assert kernel._load() is not None
