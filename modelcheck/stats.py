"""Streaming, mergeable per-layer statistics: the stats stage.

Each summary keeps a few small tensors on the model's device. ``update`` folds one
batch in with fused reductions and no host synchronisation; ``merge`` combines two
summaries exactly (two batches, or two ``torch.distributed`` ranks); ``finalize`` moves
the numbers to the host once, at the end, and returns plain frozen dataclasses.

What rules decide on is exact over every value: counts, per-unit sums and sums of
squares (accumulated in float64), extremes, per-unit activity and saturation. Higher
moments and zero counts of non-ReLU layers come from a seeded sample of at most
``sample_size`` values per batch (``sample_size`` in the result says how many values they
rest on), histograms and quantiles from a reservoir of at most ``RESERVOIR_SIZE`` of those;
both are exact whenever everything fits. Memory does not grow with the number of probe
samples.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
import torch

from modelcheck import kernel
from modelcheck.capture import LayerInfo
from modelcheck.settings import DEFAULT_SAMPLE_SIZE

DEAD_BELOW = 0.01
"""A ReLU, GELU or SiLU unit is dead when it is active (> 0) on fewer than this fraction
of positions."""

SATURATED_FROM = 0.95
"""A bounded unit is saturated when it sits in its flat region on at least this fraction."""

HISTOGRAM_BINS = 50
QUANTILE_STEPS = 100
FULL_RATE_BATCHES = 16
"""Batches sampled at the full per-batch size; a longer probe spreads their total over all
its batches, so sampling costs less per batch as the probe grows."""
MIN_BATCH_SAMPLE = 1_024
RESERVOIR_SIZE = 4_096
"""Values per layer kept for histograms and quantiles: plenty for 50 bins and 101 quantiles."""

SAMPLED_ERROR_BOUNDS = {
    "skewness": 0.05,
    "kurtosis": 0.35,
    "quantile_rank": 0.03,
    "histogram_tv": 0.06,
}
"""How far estimates from the sample may stray from the exact values, as the report states
it: skewness and excess kurtosis (absolute), each quantile's rank (fraction of values) and
the histogram's total variation. ``tests/test_stats.py`` holds estimates to these on normal,
ReLU, gamma and saturated-tanh data, sampled as 98,304 values of 393,216 for the moments
and a reservoir of RESERVOIR_SIZE for histograms and quantiles. Over 100 seeds of the sampler
the largest errors there were 0.045, 0.34 (gamma), 0.030 and 0.047."""
SAMPLED_MOMENTS_MEASURED = 98_304
"""The moment sample at which SAMPLED_ERROR_BOUNDS was measured."""

# Families whose per-unit activity (> 0) decides dead units.
ACTIVITY_FAMILIES = frozenset({"relu", "relu6", "gelu", "silu"})


@dataclass(frozen=True, slots=True)
class Histogram:
    """Counts over equal-width bins; estimated counts are scaled to the full count."""

    edges: tuple[float, ...]
    counts: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class Distribution:
    """Summary of every value one tensor stream took over the probe (host numbers)."""

    count: int
    units: int
    mean: float
    std: float
    rms: float
    min: float
    max: float
    skewness: float | None
    kurtosis: float | None
    zero_fraction: float
    nonfinite: int
    unit_mean: tuple[float, ...]
    unit_std: tuple[float, ...]
    unit_active_fraction: tuple[float, ...] | None
    unit_saturated_fraction: tuple[float, ...] | None
    dead_fraction: float | None
    saturated_fraction: float | None
    saturated_value_fraction: float | None
    histogram: Histogram | None
    quantiles: tuple[float, ...] | None
    sample_size: int  # values behind skewness, kurtosis and (non-ReLU) zero_fraction
    histogram_sample_size: int  # values behind the histogram and quantiles


@dataclass(frozen=True, slots=True)
class GradientStats:
    """Root mean square and mean magnitude of a gradient over every batch (the
    magnitude is kept for parameter gradients only)."""

    count: int
    rms: float
    mean_abs: float | None
    nonfinite: int


@dataclass(frozen=True, slots=True)
class ParameterStats:
    """One parameter tensor of a layer, read once before the run."""

    name: str
    shape: tuple[int, ...]
    mean: float
    std: float
    min: float
    max: float
    fan_in: int | None
    nonfinite: int


def _buffer(
    cache: dict, size: int, dtype: torch.dtype, device: torch.device, key: str = ""
) -> torch.Tensor:
    """A reusable flat scratch tensor of ``size`` values: a fresh large allocation per
    layer costs page faults comparable to the reduction itself."""
    slot = (key, dtype, device)
    flat = cache.get(slot)
    if flat is None or flat.numel() < size:
        cache.pop(("views", *slot), None)  # they would keep the old buffer alive
        flat = cache[slot] = torch.empty(size, dtype=dtype, device=device)
    return flat[:size]


def _ones(cache: dict, size: int, device: torch.device) -> torch.Tensor:
    slot = ("ones", device)
    ones = cache.get(slot)
    if ones is None or ones.numel() < size:
        ones = cache[slot] = torch.ones(size, dtype=torch.float64, device=device)
    return ones[:size]


_KEPT_VIEWS = 64
"""Workspace views kept per buffer, one per shape."""


def _workspace(
    cache: dict, like: torch.Tensor, dtype: torch.dtype | None = None, key: str = ""
) -> torch.Tensor:
    """A reusable scratch tensor shaped like ``like`` (see ``_buffer``). The view is kept
    until the buffer grows: slicing and viewing anew costs a few microseconds, as much as a
    reduction over a small activation."""
    dtype = dtype or like.dtype
    views = cache.get(("views", key, dtype, like.device))
    view = None if views is None else views.get(like.shape)
    if view is None:
        view = _buffer(cache, like.numel(), dtype, like.device, key).view(like.shape)
        views = cache.setdefault(("views", key, dtype, like.device), {})
        if len(views) >= _KEPT_VIEWS:  # shapes that change every batch
            views.clear()
        views[like.shape] = view
    return view


def _memory_order(x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """``x`` with its axes permuted into memory order (largest stride first), and that
    order: a transposed or channels-last tensor then flattens as a view, not a 16 MB
    copy, and no summary depends on the order of positions."""
    if x.is_contiguous():
        return x, list(range(x.dim()))
    order = sorted(range(x.dim()), key=lambda d: -x.stride(d))
    return x.permute(order), order


def _flat(x: torch.Tensor) -> torch.Tensor:
    """Every value of ``x`` in one axis, in memory order (see ``_memory_order``)."""
    return _memory_order(x)[0].reshape(-1)


def _three_axes(x: torch.Tensor, unit_dim: int) -> torch.Tensor:
    """View ``x`` as (outer, units, inner) so per-unit reductions run over axes 0 and 2."""
    x, order = _memory_order(x)
    unit_dim = order.index(unit_dim)
    shape = x.shape
    outer = math.prod(shape[:unit_dim])
    inner = math.prod(shape[unit_dim + 1 :])
    return x.reshape(outer, shape[unit_dim], inner)


# Magnitudes whose float32 squares (and sums of them) stay normal and finite, with room
# for sums over many values: beyond them a summary is recomputed in float64.
SQUARE_RANGE = (1e-18, 1e18)


def _widened(x: torch.Tensor, precise: bool) -> torch.Tensor:
    """``x`` in the dtype its squares are taken in: float64 when ``precise`` and for half
    values (their squares overflow above 256, and float64 keeps their sums exact for the
    cost of converting a two-byte tensor), the input dtype otherwise."""
    if x.is_floating_point() and (precise or x.dtype in (torch.float16, torch.bfloat16)):
        return x.to(torch.float64)
    return x


def _outside_square_range(
    largest: torch.Tensor, sumsq: torch.Tensor, total: torch.Tensor
) -> torch.Tensor:
    """Device bool: values of magnitude ``largest`` lose their squares in float32.

    Either the squares overflowed though the values are finite, or every value is so
    small that its square underflows. Float64 values never need this.
    """
    low, high = SQUARE_RANGE
    overflow = ~torch.isfinite(sumsq) & torch.isfinite(total)
    return overflow | (largest > high) | ((largest > 0) & (largest < low))


_POSITIONS = (0, 2)
"""The axes of a (outer, units, inner) view that hold positions, reduced in one call."""

_EXACT_FLOAT32_COUNT = 1 << 24
"""0/1 flags summed in float32 stay exact integers up to here (torch sums pairwise)."""


def _flags_dtype(x3: torch.Tensor) -> torch.dtype:
    # Counting through a float workspace and a float sum is several times faster than
    # summing a bool tensor into int64; float64 takes over where float32 stops being exact.
    positions = x3.numel() // max(x3.shape[1], 1)
    exact = x3.dtype == torch.float64 or positions < _EXACT_FLOAT32_COUNT
    return x3.dtype if exact else torch.float64


def _flags_workspace(cache: dict, x3: torch.Tensor) -> torch.Tensor:
    return _workspace(cache, x3, _flags_dtype(x3))


_SLOTS = 8
"""Batches (or pieces of one) whose per-unit results wait in their own dtype before one
float64 fold."""

_PIECE_VALUES = 1 << 18
"""Values of a large activation reduced together: a 1 MiB float32 piece and its workspace
stay in the L2 cache across the passes, so the activation is read from memory about once
(on a 4M-value activation, ~30% less time than passes over the whole tensor)."""


def _piece_rows(x3: torch.Tensor) -> int:
    """Rows of a (outer, units, inner) view reduced together (see ``_PIECE_VALUES``)."""
    return max(1, _PIECE_VALUES // max(1, x3.shape[1] * x3.shape[2]))


def _pieces(x3: torch.Tensor) -> int:
    """How many pieces ``_piece_rows`` cuts a (outer, units, inner) view into."""
    return -(-x3.shape[0] // _piece_rows(x3))


class _BatchSlots:
    """The per-unit results of the last few batches, each written by its reduction
    (``out=``) into a row of its own, then folded into the float64 accumulators together:
    converting and adding each batch's small results one by one costs as much as the
    reductions over the activation themselves."""

    __slots__ = (
        "_rows",
        "active",
        "capacity",
        "dsumsq",
        "dtype",
        "filled",
        "flags_dtype",
        "max",
        "min",
        "saturated",
        "sum",
        "units",
    )

    def __init__(self, x3: torch.Tensor, activity: bool, saturation: bool) -> None:
        self.dtype, self.flags_dtype, self.units = x3.dtype, _flags_dtype(x3), x3.shape[1]
        # Room for a whole batch's pieces, so its rows stay readable until the next one
        # (a summary of the same tensor copies them: see TensorSummary.update).
        self.capacity = max(_SLOTS, _pieces(x3))
        rows, device = self.capacity, x3.device
        self.sum, self.dsumsq = torch.empty(2, rows, self.units, dtype=self.dtype, device=device)
        self.min, self.max = torch.empty(2, rows, dtype=self.dtype, device=device)
        counts = {"dtype": self.flags_dtype, "device": device}
        self.active = torch.empty(rows, self.units if activity else 0, **counts)
        self.saturated = torch.empty(rows, self.units if saturation else 0, **counts)
        self._rows: list[tuple[torch.Tensor, ...]] | None = None
        self.filled = 0

    def _results(self) -> tuple[torch.Tensor, ...]:
        return self.sum, self.dsumsq, self.min, self.max, self.active, self.saturated

    def row(self, i: int) -> tuple[torch.Tensor, ...]:
        """Row i of each result, as (sum, dsumsq, min, max, active, saturated) views."""
        if self._rows is None:  # made once: slicing rows on every batch costs microseconds
            self._rows = list(zip(*self._results()))
        return self._rows[i]

    def fits(self, x3: torch.Tensor) -> bool:
        return (
            x3.dtype == self.dtype
            and x3.shape[1] == self.units
            and _flags_dtype(x3) == self.flags_dtype
        )


class _Plan:
    """What a summary reuses while its batches keep one shape and dtype: the shift in the
    compiled kernel's form, if the kernel takes these batches; else the pieces a batch is
    cut into and, per piece, the shift broadcast to its shape and the dtype its flags are
    counted in. Working these out on every batch costs a few microseconds each, as much
    as a reduction over a small activation."""

    __slots__ = ("kernel_shift", "key", "pieces", "rows", "saturation", "shift")

    def __init__(
        self, key: tuple, x3: torch.Tensor, shift: torch.Tensor, saturation: tuple | None
    ) -> None:
        self.key, self.shift = key, shift
        self.saturation = kernel.saturation_test(saturation)
        self.kernel_shift, self.pieces = None, []
        if kernel.accepts(x3) and _flags_dtype(x3) == x3.dtype:
            self.kernel_shift, self.rows = shift.to(x3.dtype).contiguous(), x3.shape[0]
            return
        self.rows = _piece_rows(x3)
        shift_like = shift.to(x3.dtype).reshape(1, -1, 1)
        self.pieces = [
            (shift_like.expand_as(piece), _flags_dtype(piece)) for piece in x3.split(self.rows)
        ]


class MomentSample:
    """Power sums of a growing sample around a fixed shift: central moments to the fourth.

    ``sums[k-1]`` is the sum of (value - shift)^k. A batch costs a few fused reductions
    and merges by addition. The shift is the first batch's mean, so the sums stay well
    conditioned: their rounding is about eps * (1 + ((mean - shift) / std)^4) relative.
    Two samples with different shifts (two ranks) merge by re-expanding one around the
    other's shift (binomial theorem), which is exact algebra.
    """

    __slots__ = ("n", "shift", "sums")

    def __init__(self, device: torch.device) -> None:
        self.n = 0
        self.shift = torch.zeros((), dtype=torch.float64, device=device)
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)

    def add(self, values: torch.Tensor, scratch: dict) -> None:
        """Fold in a 1-D float64 tensor: two elementwise ops and two matrix-vector sums
        into the running sums, with temporaries in the caller's ``scratch``."""
        n = values.numel()
        if n == 0:
            return
        if self.n == 0:
            self.shift = values.mean()
        powers = _buffer(scratch, 2 * n, torch.float64, values.device, "powers").view(2, n)
        torch.sub(values, self.shift, out=powers[0])
        torch.mul(powers[0], powers[0], out=powers[1])
        # [sum d, sum d²] = powers @ 1 and [sum d³, sum d⁴] = powers @ d².
        self.sums[:2].addmv_(powers, _ones(scratch, n, values.device))
        self.sums[2:].addmv_(powers, powers[1])
        self.n += n

    def add_float32(self, values: torch.Tensor, nonzero: torch.Tensor | None) -> None:
        """Fold in a 1-D float32 tensor the compiled kernel accepts, in one pass that also
        counts its nonzero values into ``nonzero`` (if given)."""
        if values.numel() == 0:
            return
        if self.n == 0:
            self.shift = values.mean(dtype=torch.float64)
        kernel.add_power_sums(values, float(self.shift), self.sums, nonzero)
        self.n += values.numel()

    def merge(self, other: MomentSample) -> None:
        if other.n == 0:
            return
        if self.n == 0:
            self.n, self.shift, self.sums = other.n, other.shift.clone(), other.sums.clone()
            return
        self.sums.add_(_reshifted(other.sums, other.n, other.shift - self.shift))
        self.n += other.n

    def central(self) -> tuple[float, float, float, float]:
        """(mean, m2, m3, m4): the mean and the biased central moments, on the host."""
        n = self.n
        s1, s2, s3, s4 = (v / n for v in self.sums.tolist())
        m2 = s2 - s1 * s1
        m3 = s3 - 3 * s1 * s2 + 2 * s1**3
        m4 = s4 - 4 * s1 * s3 + 6 * s1 * s1 * s2 - 3 * s1**4
        return float(self.shift) + s1, m2, m3, m4

    def shape_moments(self) -> tuple[float | None, float | None]:
        """(skewness, excess kurtosis) as scipy.stats computes them with bias=True."""
        if self.n < 2:
            return None, None
        mean, m2, m3, m4 = self.central()
        # Values equal up to rounding have no shape: their spread is float noise.
        if not math.isfinite(m2) or m2 <= (1e-12 * mean) ** 2 or m2 <= 0:
            return None, None
        # Divide step by step: m2**1.5 and m2**2 underflow for tiny values.
        root = math.sqrt(m2)
        return _finite_or_none(m3 / root / root / root), _finite_or_none(m4 / m2 / m2 - 3.0)


def _reshifted(sums: torch.Tensor, n: int, delta: torch.Tensor) -> torch.Tensor:
    """Power sums around ``shift`` re-expressed around ``shift - delta``."""
    s1, s2, s3, s4 = sums.unbind()
    d2 = delta * delta
    return torch.stack(
        (
            s1 + n * delta,
            s2 + 2 * delta * s1 + n * d2,
            s3 + 3 * delta * s2 + 3 * d2 * s1 + n * d2 * delta,
            s4 + 4 * delta * s3 + 6 * d2 * s2 + 4 * d2 * delta * s1 + n * d2 * d2,
        )
    )


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


_RESERVOIR_PIECES = 4
"""Candidate tensors a reservoir holds before joining them. Each holds at most about a
capacity's worth (a flush's offer, or another rank's reservoir), so this bounds what waits;
counting tensors rather than values also keeps a long probe's few values per batch from
piling up as thousands of small live tensors, which fragment the heap."""


class Reservoir:
    """A bounded weighted sample of values for histograms and quantiles.

    Each kept value carries the key log(u)/w (Efraimidis-Spirakis); keeping the largest
    keys merges batches and ranks without growing. Candidates are gathered and cut back
    to the capacity only every few batches, so a batch costs an append, not a top-k.
    Keys are drawn (by ``draw``: log(u) for n uniform u) only when pieces are joined or
    another rank needs them: a probe of known length offers at most the capacity in all
    (see ``TensorSummary._offered``), and nothing is dropped while the total stays within
    the capacity, so it keeps every candidate, and draws no key at all if it flushes at
    most ``_RESERVOIR_PIECES`` times.
    """

    __slots__ = ("_pieces", "capacity", "device", "draw")

    def __init__(
        self, capacity: int, device: torch.device, draw: Callable[[int, torch.device], torch.Tensor]
    ) -> None:
        self.capacity = capacity
        self.device = device
        self.draw = draw
        # (values, their keys or None until drawn, the values each stands for: a float,
        # or a tensor of one per value)
        self._pieces: list[tuple[torch.Tensor, torch.Tensor | None, float | torch.Tensor]] = []

    def add(
        self,
        values: torch.Tensor,
        weight: float | torch.Tensor,
        keys: torch.Tensor | None = None,
    ) -> None:
        self._pieces.append((values, keys, weight))
        if len(self._pieces) > _RESERVOIR_PIECES:
            self._compact()

    def _compact(self) -> None:
        """Join the pieces, keyed, cut back to the capacity."""
        if not self._pieces:
            empty = torch.empty(0, dtype=torch.float64, device=self.device)
            self._pieces = [(empty, empty.clone(), 1.0)]
        values = torch.cat([v for v, _, _ in self._pieces])
        keys = torch.cat([self._keys_of(v, k, w) for v, k, w in self._pieces])
        if values.numel() > self.capacity:
            kept = torch.topk(keys, self.capacity, sorted=False).indices
            values, keys = values.index_select(0, kept), keys.index_select(0, kept)
        self._pieces = [(values, keys, 1.0)]

    def _keys_of(
        self, values: torch.Tensor, keys: torch.Tensor | None, weight: float | torch.Tensor
    ) -> torch.Tensor:
        return keys if keys is not None else self.draw(values.numel(), self.device).div_(weight)

    @property
    def values(self) -> torch.Tensor:
        if not self._pieces or sum(v.numel() for v, _, _ in self._pieces) > self.capacity:
            self._compact()
        values = [v for v, _, _ in self._pieces]
        return torch.cat(values) if len(values) > 1 else values[0]

    def contents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, keys), the keys drawn where missing."""
        self._compact()
        values, keys, _ = self._pieces[0]
        return values, keys

    def merge(self, other: Reservoir) -> None:
        for values, keys, weight in other._pieces:
            self.add(values, weight, keys)


def batch_sample_size(sample_size: int, batches: int | None) -> int:
    """Values to sample per layer and batch: ``sample_size`` for up to 16 batches, beyond
    that 16 × ``sample_size`` spread evenly over every batch (at least 1,024 each).

    Every batch of a probe is sampled at the same rate, so the moments need no weights.
    """
    if batches is None or batches <= FULL_RATE_BATCHES:
        return sample_size
    spread = sample_size * FULL_RATE_BATCHES // batches
    return max(spread, min(sample_size, MIN_BATCH_SAMPLE))


@dataclass(frozen=True, slots=True)
class _Positions:
    """``size`` flat positions drawn uniformly with replacement from ``range(n)``, as
    ``ascending`` (for the kernel, which copies each as it passes) and ``places``, where
    ``ascending[i]`` goes in the sample; ``in_sample_order`` lists them as the sample
    holds them (for a gather)."""

    ascending: torch.Tensor
    places: torch.Tensor
    in_sample_order: torch.Tensor

    @staticmethod
    def draw(n: int, size: int, generator: torch.Generator) -> _Positions:
        # Sorted uniforms without a sort (a third of its cost): the running sums of
        # size + 1 exponential gaps, over their total, are distributed as the order
        # statistics of size uniforms. A random permutation then places them, so the
        # sample's order is random and any run of it a uniform sample too.
        device = generator.device
        uniform = torch.rand(size + 1, dtype=torch.float64, generator=generator, device=device)
        ends = uniform.neg_().log1p_().neg_().cumsum_(0)  # -log(1 - u): finite, as u < 1
        ascending = ends[:size].mul_(n / ends[size]).to(torch.int64).clamp_(max=n - 1)
        places = torch.randperm(size, generator=generator, device=device)
        in_sample_order = torch.empty_like(ascending).index_copy_(0, places, ascending)
        return _Positions(ascending, places, in_sample_order)


class Sampler:
    """Seeded choice of which values of a batch enter the moment sample and reservoir,
    at a rate set by the probe's length in ``batches`` (unknown: None), which also spreads
    the reservoir over the batches.

    The flat positions are drawn once per tensor size and reused, so the sample costs
    one gather per batch and does not depend on which rank sees which batch.
    """

    def __init__(
        self, sample_size: int = DEFAULT_SAMPLE_SIZE, seed: int = 0, batches: int | None = None
    ) -> None:
        self.sample_size = batch_sample_size(sample_size, batches)
        self.seed = seed
        self.batches = batches
        self._drawn: dict[tuple[int, torch.device], _Positions] = {}
        self._orders: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._generators: dict[torch.device, torch.Generator] = {}

    def take(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(a copy of at most ``sample_size`` values of x, how many values each stands for).

        Always a copy, in x's dtype: the model may overwrite ``x`` in place later. Every
        value of a small x is taken, in a seeded random order: any run of a sample is then a
        uniform sample of x, as the reservoir takes it.
        """
        flat = _flat(x)
        if flat.numel() <= self.sample_size:
            return flat.index_select(0, self._order_for(flat.numel(), flat.device)), 1.0
        positions = self._positions_for(flat.numel(), flat.device).in_sample_order
        return flat.index_select(0, positions), flat.numel() / self.sample_size

    def for_kernel(
        self, x3: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float] | None:
        """The sample ``take`` would copy, for the kernel to copy in its pass instead, as
        (ascending positions, their places in the sample, the empty sample, how many values
        each stands for); None when every value is taken."""
        n = x3.numel()
        if n <= self.sample_size:
            return None
        drawn = self._positions_for(n, x3.device)
        out = torch.empty(self.sample_size, dtype=x3.dtype, device=x3.device)
        return drawn.ascending, drawn.places, out, n / self.sample_size

    def _positions_for(self, n: int, device: torch.device) -> _Positions:
        drawn = self._drawn.get((n, device))
        if drawn is None:
            drawn = self._drawn[(n, device)] = _Positions.draw(
                n, self.sample_size, torch.Generator(device=device).manual_seed(self.seed + n)
            )
        return drawn

    def _order_for(self, n: int, device: torch.device) -> torch.Tensor:
        order = self._orders.get((n, device))
        if order is None:
            gen = torch.Generator(device=device).manual_seed(self.seed + n)
            order = self._orders[(n, device)] = torch.randperm(n, generator=gen, device=device)
        return order

    def keys(self, n: int, device: torch.device) -> torch.Tensor:
        """log(u) for n uniform u: divided by a value's weight, its reservoir key."""
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return torch.rand(n, dtype=torch.float64, generator=gen, device=device).log_()


_SAMPLE_FLUSH = 16_384
"""Sampled values a summary collects before folding them into its moments and reservoir:
small samples share those dozen small operations, while what waits stays at 64 KiB per
layer (many small waiting tensors fragment the heap: 4x this cost ~50 MiB on 40 layers)."""


class TensorSummary:
    """Everything modelcheck keeps about one stream of tensors (a layer's outputs).

    ``unit_dim`` picks the axis whose entries are units (Linear features, Conv channels);
    every other axis counts as positions. ``activity`` tracks, per unit, how often it is
    positive (ReLU family); ``saturation`` = (low, high) counts values at or beyond the
    flat regions of a bounded activation.

    Per unit it keeps the sum of x and of (x - shift)², with the shift taken from the
    unit means of the first batch (of its first piece): a layer whose values sit far
    from zero (sigmoid outputs near 1, a collapsed output) keeps its spread exactly
    instead of losing it to the cancellation of sum(x²) - sum(x)²/n. Passes over each
    batch: sum; squared deviations written into a shared workspace and summed; both
    extremes; plus a flag-and-count for activity or saturation (a float32 batch in CPU
    memory takes one pass of the compiled kernel instead: see kernel.py). Each reduction covers
    every position axis in one call in the input's dtype (pairwise summation: float32
    partial sums are good to ~1e-7), and only the per-unit results are accumulated in
    float64.
    """

    def __init__(
        self,
        sampler: Sampler,
        *,
        activity: bool = False,
        saturation: tuple[float, float] | None = None,
        scratch: dict | None = None,
        precise: bool = False,
    ) -> None:
        self.sampler = sampler
        self.activity = activity
        self.saturation = saturation
        self.precise = precise
        self.count = 0
        self.units = 0
        self.unit_shift: torch.Tensor | None = None
        self.unit_sum: torch.Tensor | None = None
        self.unit_dsumsq: torch.Tensor | None = None
        self.unit_min: torch.Tensor | None = None  # the layer's minimum, shape (1,)
        self.unit_max: torch.Tensor | None = None
        self.unit_active: torch.Tensor | None = None
        self.unit_saturated: torch.Tensor | None = None
        self.nonfinite = 0
        self.moments: MomentSample | None = None
        self.sample_nonzero: torch.Tensor | None = None
        self.reservoir: Reservoir | None = None
        self._slots: _BatchSlots | None = None
        self.updates = 0
        # The slot rows of the last batch while they are intact, as (slots, first, count),
        # and the shift tensor of the summary this one started by copying (each summary
        # holds its own copy of a shift, so the tensor names the summary): see ``update``.
        self._last_rows: tuple[_BatchSlots, int, int] | None = None
        self._shift_source: torch.Tensor | None = None
        # The kernel's results for the last batch alone, while they are its (see update),
        # in a buffer of 4 x units + 2 values the kernel rewrites every batch.
        self._last_batch: torch.Tensor | None = None
        self._batch_buffer: torch.Tensor | None = None
        self._pending: list[tuple[torch.Tensor, float]] = []
        self._pending_values = 0
        # Values of the probe the reservoir's offers were counted over, and all it will
        # have (known once the first batch is seen): see ``_offered``.
        self._offer_seen = 0
        self._offer_whole: int | None = None
        self._plan: _Plan | None = None
        # Workspaces shared by every summary of a run: one activation-sized buffer in
        # all, not one per layer (which would hold a batch of every activation).
        self._scratch = {} if scratch is None else scratch

    # -- streaming --------------------------------------------------------------------

    def update(self, x: torch.Tensor, unit_dim: int, same_as: TensorSummary | None = None) -> None:
        """Fold one batch in: a handful of reductions, no host synchronisation.

        ``same_as`` is a summary whose last batch was this very tensor, unchanged (an
        eval-mode Dropout returns its input itself): its per-unit results are copied
        instead of reduced again, where they are still in its slots.
        """
        if x.numel() == 0:  # a layer with no outputs (Linear(n, 0)) has nothing to show
            return
        x = _widened(x.detach(), self.precise)
        if x.dim() == 0:
            x, unit_dim = x.reshape(1), 0
        x3 = _three_axes(x, unit_dim)
        self.updates += 1
        self._last_rows = self._last_batch = None
        sample = None
        if same_as is None or not self._copied_from(same_as, x3):
            sample = self._reduce(x3)
        if sample is None:
            sample = self.sampler.take(x3)
        self._pending.append(sample)
        self._pending_values += sample[0].numel()
        if self._pending_values >= _SAMPLE_FLUSH:
            self._flush_samples()

    def _flush_samples(self) -> None:
        """Fold the waiting samples into the moments, zero count and reservoir.

        The reservoir is offered a run of each batch's sample (itself a uniform sample, as
        a sample's order is random) standing for the whole batch: selecting among all
        sampled values would cost random keys and a top-k for every one.
        """
        if not self._pending:
            return
        samples = [sample for sample, _ in self._pending]
        values = torch.cat(samples) if len(samples) > 1 else samples[0]
        counted = None if self.activity else self.sample_nonzero  # ReLU counts zeros exactly
        if kernel.accepts(values):
            self.moments.add_float32(values, counted)
        else:
            values = values.to(torch.float64)
            self.moments.add(values, self._scratch)
            if counted is not None:
                counted.add_(torch.count_nonzero(values))
        offered, weights, start = [], [], 0
        for sample, weight in self._pending:
            at, kept = self._offered(sample.numel(), weight, start, values.numel())
            if kept:
                offered.append(values[start + at : start + at + kept])
                weights.append((kept, weight * sample.numel() / kept))
            start += sample.numel()
        self._pending, self._pending_values = [], 0
        if not offered:
            return
        candidates = torch.cat(offered) if len(offered) > 1 else offered[0]
        candidates = candidates.to(torch.float64)
        if len({w for _, w in weights}) == 1:
            self.reservoir.add(candidates, weights[0][1])
        else:  # a short batch: each of its values stands for fewer values
            per_value = [torch.full((n,), w, dtype=torch.float64) for n, w in weights]
            self.reservoir.add(candidates, torch.cat(per_value).to(candidates.device))

    def _offered(self, n: int, weight: float, start: int, total: int) -> tuple[int, int]:
        """Which of a batch's ``n`` sampled values, each standing for ``weight`` values,
        to offer the reservoir, ``start`` values into a flush of ``total``: (first, count)
        of a run of them. Any run of a sample is a uniform sample of the batch (its order
        is random). Each count is rounded at the running total, so the counts add up to
        their share exactly."""
        capacity, batches = self.reservoir.capacity, self.sampler.batches
        if not batches:  # a stream: at most a capacity per flush, shared by its batches
            share = min(1.0, capacity / total)
            return 0, min(n, max(1, round((start + n) * share) - round(start * share)))
        # A probe of known length: the capacity spread over all its batches in proportion
        # to their values (the first standing for a typical batch), so each candidate
        # stands for as many values as any other and the reservoir need not choose.
        values = round(n * weight)
        if self._offer_whole is None:
            self._offer_whole = batches * values
        before, self._offer_seen = self._offer_seen, self._offer_seen + values
        first, last = (capacity * seen // self._offer_whole for seen in (before, self._offer_seen))
        kept = min(n, last - first)
        # Batches sample the same positions: each offers the run after the last one's,
        # so the reservoir holds as many positions as it can rather than a few again.
        return min(first % n, n - kept), kept

    def _reduce(self, x3: torch.Tensor) -> tuple[torch.Tensor, float] | None:
        """Reduce a batch; returns its sample when the kernel copied that in the same pass."""
        if self.count and x3.shape[1] != self.units:
            self._fold()  # a module called with differently shaped inputs
            self._absorb(self._batch_part(x3))
            return None
        if self.unit_sum is None:
            self._start(x3)
        plan = self._plan_for(x3)
        if plan.kernel_shift is not None:
            self._fold()  # batches of another dtype may still wait in the slots
            return self._into_totals(x3, plan)
        if self._slots is None or not self._slots.fits(x3):
            self._fold()  # the first batch, or one of another dtype
            self._slots = _BatchSlots(x3, self.activity, self.saturation is not None)
        self._into_slots(x3, self._slots, plan)
        return None

    def _into_totals(self, x3: torch.Tensor, plan: _Plan) -> tuple[torch.Tensor, float] | None:
        """The whole batch in one compiled pass, added straight to the accumulators; its
        sample too, copied as each row is read (a gather afterwards would read a large
        activation's positions from memory again, one cache miss each)."""
        sample = self.sampler.for_kernel(x3)
        batch = self._own_batch_buffer(4 * x3.shape[1] + 2)
        totals = [self.unit_sum, self.unit_dsumsq, self.unit_active, self.unit_saturated]
        totals = [None if t is None else t.data_ptr() for t in totals]
        totals += [self.unit_min.data_ptr(), self.unit_max.data_ptr()]
        copy = None if sample is None else sample[:3]
        kernel.reduce_into(x3, plan.kernel_shift, totals, plan.saturation, batch, copy)
        self.count += x3.numel()
        self._last_batch = batch
        return None if sample is None else sample[2:]  # (values, weight), as take gives

    def _into_slots(self, x3: torch.Tensor, slots: _BatchSlots, plan: _Plan) -> None:
        first, pieces = slots.filled, len(plan.pieces)
        for piece, planned in zip(x3.split(plan.rows) if pieces > 1 else (x3,), plan.pieces):
            self._piece_into_row(piece, slots.row(slots.filled), *planned)
            self._row_filled(slots, piece.numel())
        if first + pieces <= slots.capacity:  # no fold in between overwrote them
            self._last_rows = (slots, first, pieces)

    def _plan_for(self, x3: torch.Tensor) -> _Plan:
        # A new shift (another rank's mean) is a new tensor: it makes a new plan.
        key = (x3.shape, x3.dtype)
        plan = self._plan
        if plan is None or plan.key != key or plan.shift is not self.unit_shift:
            plan = self._plan = _Plan(key, x3, self.unit_shift, self.saturation)
        return plan

    def _copied_from(self, source: TensorSummary, x3: torch.Tensor) -> bool:
        """Add ``source``'s results for its last batch (the kernel's, or its slot rows), if
        they hold everything this summary keeps, around the same shift; False to reduce
        ``x3`` instead."""
        if (
            (source._last_batch is None and source._last_rows is None)
            or (self.activity and not source.activity)
            or (self.saturation is not None and self.saturation != source.saturation)
        ):
            return False
        if self.count == 0:  # start from the source's shift, so the sums agree
            self.start_empty(source.units, x3.device, source.unit_shift)
            self._shift_source = source.unit_shift
        if self._shift_source is not source.unit_shift or x3.shape[1] != self.units:
            return False
        if source._last_batch is not None:
            self._add_batch(source._last_batch)
        elif not self._copy_rows(source._last_rows, x3):
            return False
        self.count += x3.numel()
        return True

    def _add_batch(self, batch: torch.Tensor) -> None:
        """Add a batch's results as the kernel wrote them (see kernel.reduce_into)."""
        units = self.units
        sums = batch[: 4 * units].view(4, units)
        for row, total in enumerate(
            (self.unit_sum, self.unit_dsumsq, self.unit_active, self.unit_saturated)
        ):
            if total is not None:
                total.add_(sums[row])
        extremes = batch[4 * units :]
        torch.minimum(self.unit_min, extremes[:1], out=self.unit_min)
        torch.maximum(self.unit_max, extremes[1:], out=self.unit_max)
        # A copy: the source rewrites its buffer when next called (a module called twice in
        # a batch), while a later layer may still return this tensor and copy from here.
        self._last_batch = self._own_batch_buffer(batch.numel()).copy_(batch)

    def _own_batch_buffer(self, size: int) -> torch.Tensor:
        """This summary's buffer for a batch's results (see kernel.reduce_into)."""
        if self._batch_buffer is None or self._batch_buffer.numel() != size:
            self._batch_buffer = torch.empty(size, dtype=torch.float64)
        return self._batch_buffer

    def _copy_rows(self, rows: tuple[_BatchSlots, int, int], x3: torch.Tensor) -> bool:
        """Copy another summary's slot rows into this one's slots."""
        theirs, first, n = rows
        if self._slots is None:
            self._slots = _BatchSlots(x3, self.activity, self.saturation is not None)
        slots = self._slots
        if not slots.fits(x3) or n > slots.capacity:
            return False
        if slots.filled + n > slots.capacity:
            self._fold()
        at = slots.filled
        pairs = [(slots.sum, theirs.sum), (slots.dsumsq, theirs.dsumsq)]
        pairs += [(slots.min, theirs.min), (slots.max, theirs.max)]
        if self.activity:
            pairs.append((slots.active, theirs.active))
        if self.saturation is not None:
            pairs.append((slots.saturated, theirs.saturated))
        for mine, copied in pairs:
            mine[at : at + n].copy_(copied[first : first + n])
        slots.filled += n
        self._last_rows = (slots, at, n)
        if slots.filled == slots.capacity:
            self._fold()
        return True

    def _row_filled(self, slots: _BatchSlots, values: int) -> None:
        """Count a slot row just written, folding the slots once they are all full."""
        self.count += values
        slots.filled += 1
        if slots.filled == slots.capacity:
            self._fold()

    def _piece_into_row(
        self,
        x3: torch.Tensor,
        row: tuple[torch.Tensor, ...],
        shift: torch.Tensor,
        flags_dtype: torch.dtype,
    ) -> None:
        """Reduce one piece into a slot row, with the shift its plan broadcast."""
        unit_sum, unit_dsumsq, low, high, active, saturated = row
        # (x - shift)² in one fused pass into the workspace (sub then square is two).
        squares = torch._C._nn.mse_loss(x3, shift, 0, out=_workspace(self._scratch, x3))
        torch.sum(x3, _POSITIONS, out=unit_sum)
        torch.sum(squares, _POSITIONS, out=unit_dsumsq)
        torch.aminmax(x3, out=(low, high))
        if self.activity or self.saturation is not None:
            flags = _workspace(self._scratch, x3, flags_dtype)
        if self.activity:
            torch.sum(torch.gt(x3, 0, out=flags), _POSITIONS, out=active)
        if self.saturation is not None:
            torch.sum(self._saturation_flags(x3, flags), _POSITIONS, out=saturated)

    def _fold(self) -> None:
        """Add the batches waiting in the slots to the float64 accumulators."""
        slots = self._slots
        if slots is None or slots.filled == 0:
            return
        filled, wide = slots.filled, torch.float64
        self.unit_sum.add_(slots.sum[:filled].sum(0, dtype=wide))
        self.unit_dsumsq.add_(slots.dsumsq[:filled].sum(0, dtype=wide))
        torch.minimum(self.unit_min, slots.min[:filled].min().to(wide), out=self.unit_min)
        torch.maximum(self.unit_max, slots.max[:filled].max().to(wide), out=self.unit_max)
        if self.unit_active is not None:
            self.unit_active.add_(slots.active[:filled].sum(0, dtype=wide))
        if self.unit_saturated is not None:
            self.unit_saturated.add_(slots.saturated[:filled].sum(0, dtype=wide))
        slots.filled = 0

    def flush(self) -> None:
        """Fold everything still waiting (slots and samples) into the accumulators."""
        self._fold()
        self._flush_samples()

    def _start(self, x3: torch.Tensor) -> None:
        """Empty accumulators, shifted by the unit means of the first batch's first
        piece: any shift is exact, one near the mean keeps the sums well conditioned, and
        a piece costs a fraction of another pass over a large activation."""
        first = x3[: _piece_rows(x3)]
        # Few positions per unit (4 or 16: late conv layers) reduce far faster axis by axis.
        shift = first.mean(_POSITIONS) if x3.shape[2] > 16 else first.mean(0).mean(1)
        self.start_empty(x3.shape[1], x3.device, shift)
        self._shift_source = None

    def start_empty(
        self, units: int, device: torch.device, shift: torch.Tensor | None = None
    ) -> None:
        """Empty accumulators for ``units`` units (a rank that saw no batch of a layer
        starts here too, so every rank merges state of the same shape): rows of one
        tensor, as a few small operations per summary cost more than a small reduction."""
        kept = [True, True, True, self.activity, self.saturation is not None]
        rows = iter(torch.zeros(sum(kept), units, dtype=torch.float64, device=device))
        self.unit_shift, self.unit_sum, self.unit_dsumsq, self.unit_active, self.unit_saturated = (
            next(rows) if keep else None for keep in kept
        )
        if shift is not None:
            self.unit_shift.copy_(shift)  # a float32 shift is a float64 value too
        self.unit_min, self.unit_max = torch.full(
            (2, 1), math.inf, dtype=torch.float64, device=device
        )
        self.unit_max.neg_()
        self.count, self.units = 0, units
        self._start_samples(device)

    def _batch_part(self, x3: torch.Tensor) -> dict[str, torch.Tensor | int]:
        """One batch's sums, centred on its own unit means (see ``_absorb``)."""
        shift = x3.mean(_POSITIONS, keepdim=True)
        squares = torch._C._nn.mse_loss(
            x3, shift.expand_as(x3), 0, out=_workspace(self._scratch, x3)
        )
        part: dict[str, torch.Tensor | int] = {
            "count": x3.numel(),
            "units": x3.shape[1],
            "shift": shift.reshape(-1),
            "sum": x3.sum(_POSITIONS),
            "dsumsq": squares.sum(_POSITIONS),
        }
        # The layer's extremes in one pass (per-unit extremes cost two slower ones).
        part["min"], part["max"] = (t.reshape(1) for t in torch.aminmax(x3))
        if self.activity:
            flags = torch.gt(x3, 0, out=_flags_workspace(self._scratch, x3))
            part["active"] = flags.sum(_POSITIONS)
        if self.saturation is not None:
            flags = _flags_workspace(self._scratch, x3)
            part["saturated"] = self._saturation_flags(x3, flags).sum(_POSITIONS)
        return part

    def _saturation_flags(self, x3: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
        """1 where a value sits at or beyond the flat regions, written into ``flags``."""
        low, high = self.saturation
        if math.isinf(low):
            torch.ge(x3, high, out=flags)
        else:
            centre, half = (high + low) / 2, (high - low) / 2
            if centre == 0:
                torch.abs(x3, out=flags)
            else:
                torch.sub(x3, centre, out=flags).abs_()
            torch.ge(flags, half, out=flags)
        return flags

    def _adopt(self, part: dict, device: torch.device) -> None:
        # Accumulators are float64 copies, updated in place from here on. The shift is
        # kept exactly as the batch used it (a float32 shift is a float64 value too).
        self.count, self.units = part["count"], part["units"]
        for name in _UNIT_FIELDS:
            value = part.get(name)
            setattr(self, "unit_" + name, None if value is None else _float64_copy(value))
        self._start_samples(device)

    def _start_samples(self, device: torch.device) -> None:
        self.moments = MomentSample(device)
        self.sample_nonzero = torch.zeros((), dtype=torch.int64, device=device)
        self.reservoir = Reservoir(RESERVOIR_SIZE, device, self.sampler.keys)

    def _absorb(self, part: dict) -> None:
        if part["units"] != self.units:
            # A module called with differently shaped inputs: keep only layer totals.
            part = _collapse_units(part)
            self._collapse_units()
        if part["shift"] is not self.unit_shift:
            part = _reshifted_part(part, self.unit_shift)
        self.count += part["count"]
        self.unit_sum.add_(part["sum"])
        self.unit_dsumsq.add_(part["dsumsq"])
        torch.minimum(self.unit_min, part["min"], out=self.unit_min)
        torch.maximum(self.unit_max, part["max"], out=self.unit_max)
        if self.unit_active is not None:
            self.unit_active.add_(part["active"])
        if self.unit_saturated is not None:
            self.unit_saturated.add_(part["saturated"])

    def _state(self) -> dict:
        state = {"count": self.count, "units": self.units}
        state.update({name: getattr(self, "unit_" + name) for name in _UNIT_FIELDS})
        return state

    def _collapse_units(self) -> None:
        state = _collapse_units(self._state())
        self.units = 1
        for name in _UNIT_FIELDS:
            setattr(self, "unit_" + name, state.get(name))

    def add_nonfinite(self, count: int) -> None:
        self.nonfinite += count

    def merge(self, other: TensorSummary) -> None:
        """Fold another summary of the same stream in (another batch range or rank)."""
        if other.count == 0:
            return
        self.flush()
        other.flush()
        if self.count == 0:
            self._adopt(other._state(), other.unit_shift.device)
            self.nonfinite = other.nonfinite
            self.moments.merge(other.moments)
            self.sample_nonzero.add_(other.sample_nonzero)
            self.reservoir.merge(other.reservoir)
            return
        self._absorb(other._state())
        self.nonfinite += other.nonfinite
        self.moments.merge(other.moments)
        self.sample_nonzero.add_(other.sample_nonzero)
        self.reservoir.merge(other.reservoir)

    @property
    def device(self) -> torch.device:
        """Where the accumulators are (a started summary)."""
        return self.unit_sum.device

    @staticmethod
    def square_terms(summaries: Sequence[TensorSummary]) -> torch.Tensor:
        """What shows whether float32 squares could hold each summary's values, for
        ``_outside_square_range``: a (3, n) float64 tensor of (largest finite magnitude,
        sum of squared deviations, sum), in a few operations for all of them. The
        summaries are started, in float32 (or wider) and on one device."""
        for summary in summaries:
            summary._fold()
        extremes = torch.stack(
            [torch.cat([s.unit_min for s in summaries]), torch.cat([s.unit_max for s in summaries])]
        ).abs_()
        largest = torch.where(torch.isfinite(extremes), extremes, 0).amax(0)
        # Each summary's per-unit sums, added up by index: one add for all of them.
        device = extremes.device
        units = torch.tensor([s.unit_sum.numel() for s in summaries], device=device)
        owner = torch.repeat_interleave(torch.arange(len(summaries), device=device), units)
        per_unit = torch.stack(
            [
                torch.cat([s.unit_dsumsq for s in summaries]),
                torch.cat([s.unit_sum for s in summaries]),
            ],
            dim=1,
        )
        totals = torch.zeros(len(summaries), 2, dtype=torch.float64, device=device)
        totals.index_add_(0, owner, per_unit)
        return torch.cat([largest.unsqueeze(0), totals.T])

    def finite_flag(self) -> torch.Tensor:
        """A device bool that is True when some value seen so far was NaN or infinite.

        A non-finite value poisons its unit's sum; reading the flag once at the end
        avoids counting non-finite values on every batch.
        """
        if self.unit_sum is None:
            return torch.zeros((), dtype=torch.bool)
        self._fold()
        return ~torch.isfinite(self.unit_sum).all()

    # -- result -----------------------------------------------------------------------

    def finalize(self) -> Distribution | None:
        if self.count == 0:
            return None
        self.flush()
        host = _to_host(self)
        positions = self.count / self.units
        # Inf outputs make inf - inf here: NaN statistics, which the nonfinite rule reports.
        with np.errstate(invalid="ignore"):
            d_mean = host["sum"] / positions - host["shift"]
            unit_mean = host["shift"] + d_mean
            unit_var = np.maximum(host["dsumsq"] / positions - d_mean**2, 0.0)
        lo, hi = float(host["min"].min()), float(host["max"].max())
        unit_var = _within_half_range(unit_var, lo, hi)
        mean = float(unit_mean.mean())
        # Total spread = spread within units + spread of the unit means: no cancellation.
        variance = float(np.mean(unit_var) + np.mean((unit_mean - mean) ** 2))
        variance = float(_within_half_range(np.float64(variance), lo, hi))
        skewness, kurtosis = self.moments.shape_moments()
        sample_n = self.moments.n
        values = host["sample"]
        active = saturated = None
        zero_fraction = 1.0 - float(host["sample_nonzero"]) / sample_n if sample_n else 0.0
        if host.get("active") is not None:
            active = host["active"] / positions
            zero_fraction = 1.0 - float(host["active"].sum()) / self.count
        if host.get("saturated") is not None:
            saturated = host["saturated"] / positions
        ordered = _sorted(values[np.isfinite(values)])
        return Distribution(
            count=self.count,
            units=self.units,
            mean=mean,
            std=math.sqrt(variance) if variance >= 0 else math.nan,
            rms=math.sqrt(variance + mean * mean) if variance >= 0 else math.nan,
            min=lo,
            max=hi,
            skewness=skewness,
            kurtosis=kurtosis,
            zero_fraction=zero_fraction,
            nonfinite=self.nonfinite,
            unit_mean=tuple(unit_mean.tolist()),
            unit_std=tuple(np.sqrt(unit_var).tolist()),
            unit_active_fraction=None if active is None else tuple(active.tolist()),
            unit_saturated_fraction=None if saturated is None else tuple(saturated.tolist()),
            dead_fraction=None if active is None else float(np.mean(active < DEAD_BELOW)),
            saturated_fraction=(
                None if saturated is None else float(np.mean(saturated >= SATURATED_FROM))
            ),
            saturated_value_fraction=(
                None if saturated is None else float(host["saturated"].sum()) / self.count
            ),
            histogram=_histogram(ordered, lo, hi, self.count - self.nonfinite),
            quantiles=_quantiles(ordered, lo, hi),
            sample_size=min(sample_n, self.count),
            histogram_sample_size=int(values.size),
        )


def _within_half_range(variance: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Cap a variance at the square of half the range, which no distribution exceeds.

    The layer's exact extremes bound any rounding left in a variance, and make it exactly
    0 when every value is the same.
    """
    half = (hi - lo) / 2  # Python floats: an overflow is inf, without numpy's warning
    return np.minimum(variance, half * half) if math.isfinite(half) else variance


_UNIT_FIELDS = ("shift", "sum", "dsumsq", "min", "max", "active", "saturated")
"""Per-unit state, each a float64 vector (``active``/``saturated`` only where tracked;
``min``/``max`` hold the layer's extremes, one value each)."""


def _float64_copy(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64, copy=True)


def _reshifted_part(part: dict, shift: torch.Tensor) -> dict:
    """Per-unit squared deviations of ``part`` re-expressed around ``shift`` (binomial)."""
    positions = part["count"] / part["units"]
    old = part["shift"].to(torch.float64)
    delta = old - shift
    dsum = part["sum"].to(torch.float64) - positions * old
    return dict(
        part,
        shift=shift,
        dsumsq=part["dsumsq"] + 2 * delta * dsum + positions * delta * delta,
    )


def _collapse_units(part: dict) -> dict:
    """One unit holding a layer's totals: every unit re-expressed around a common shift."""
    common = part["shift"].to(torch.float64).mean().reshape(1)
    part = _reshifted_part(part, common)
    collapsed = dict(part, units=1, shift=common)
    for key in ("sum", "dsumsq", "active", "saturated"):
        if part.get(key) is not None:
            collapsed[key] = part[key].sum().reshape(1)
    collapsed["min"] = part["min"].min().reshape(1)
    collapsed["max"] = part["max"].max().reshape(1)
    return collapsed


def _to_host(s: TensorSummary) -> dict[str, np.ndarray]:
    """Move every device tensor of a summary to the host in one go."""
    tensors = {name: getattr(s, "unit_" + name) for name in _UNIT_FIELDS}
    tensors["sample"] = s.reservoir.values
    tensors["sample_nonzero"] = s.sample_nonzero
    return {k: None if v is None else v.detach().cpu().numpy() for k, v in tensors.items()}


def _sorted(values: np.ndarray) -> np.ndarray:
    """``np.sort(values)``: in float32 when that holds them exactly (the sample of a float32
    activation), which sorts in about half the time."""
    narrow = values.astype(np.float32)
    if np.array_equal(narrow, values):
        return np.sort(narrow).astype(np.float64)
    return np.sort(values)


def _histogram(ordered: np.ndarray, lo: float, hi: float, total: int) -> Histogram | None:
    """``np.histogram``'s equal bins over [lo, hi] (lo ± 0.5 when every value is lo), its
    counts read off the sorted sample by bisection: bin i holds edges[i] <= v < edges[i+1],
    the last its right edge too. numpy's own pass costs several times the sort."""
    if ordered.size == 0 or not (math.isfinite(lo) and math.isfinite(hi)):
        return None
    # Beyond 2^20 the ± is relative: lo ± 0.5 is lo itself from 2^53 on, an empty range.
    pad = max(0.5, abs(lo) * 2.0**-21)
    first, last = (lo, hi) if hi > lo else (lo - pad, hi + pad)
    edges = np.linspace(first, last, HISTOGRAM_BINS + 1)
    below = np.searchsorted(ordered, edges, side="left")
    below[-1] = np.searchsorted(ordered, edges[-1], side="right")
    scale = total / ordered.size
    return Histogram(edges=tuple(edges.tolist()), counts=tuple((np.diff(below) * scale).tolist()))


_QUANTILE_LEVELS = np.linspace(0.0, 1.0, QUANTILE_STEPS + 1)


def _quantiles(ordered: np.ndarray, lo: float, hi: float) -> tuple[float, ...] | None:
    """numpy's default (linear) quantiles at every percent of the sorted sample:
    ``np.quantile`` partitions once per quantile, 9x slower on a full reservoir."""
    if ordered.size == 0:
        return None
    position = _QUANTILE_LEVELS * (ordered.size - 1)
    below = np.floor(position).astype(np.intp)
    a, b = ordered[below], ordered[np.minimum(below + 1, ordered.size - 1)]
    t = position - below
    # Interpolated from the nearer neighbour, as numpy does, so the results are numpy's.
    q = np.where(t >= 0.5, b - (b - a) * (1 - t), a + (b - a) * t)
    # The exact extremes are known; the sample's may fall short of them.
    q[0], q[-1] = lo, hi
    return tuple(q.tolist())


class GradientSummary:
    """Running sums of squares (and, for parameters, magnitudes) of a gradient stream.

    Output gradients keep only their sum of squares: nothing reads their mean magnitude,
    and each kept sum is another pass over a tensor as large as the activation. The sum
    of squares is exact over every value; the sum of magnitudes of a tensor larger than
    the sampler's sample comes from that seeded sample (abs-and-sum is two passes over
    a gradient as large as its weight, and mean |g| only has to tell 1e-7 from 1e-3).
    """

    def __init__(
        self,
        sampler: Sampler | None = None,
        scratch: dict | None = None,
        precise: bool = False,
    ) -> None:
        self.sampler = sampler
        self.magnitudes = sampler is not None
        self.precise = precise
        self.count = 0
        self.sumsq: torch.Tensor | None = None
        self.sumabs: torch.Tensor | None = None
        self.nonfinite = 0
        self._scratch = {} if scratch is None else scratch

    def update(self, grads: Sequence[torch.Tensor]) -> None:
        for g in grads:
            g = _widened(g.detach(), self.precise)
            if self.sumsq is None:
                self._start(g.device)
            self.sumsq.add_(_sum_of_squares(g))
            if self.sampler is not None:
                values, weight = self.sampler.take(g)
                self.sumabs.add_(values.abs_().sum(), alpha=weight)
            self.count += g.numel()

    def _start(self, device: torch.device) -> None:
        self.sumsq = torch.zeros((), dtype=torch.float64, device=device)
        if self.magnitudes:
            self.sumabs = torch.zeros((), dtype=torch.float64, device=device)

    def merge(self, other: GradientSummary) -> None:
        if not other.count:
            return
        if self.sumsq is None:
            self._start(other.sumsq.device)
        self.sumsq.add_(other.sumsq)
        if self.magnitudes:
            self.sumabs.add_(other.sumabs)
        self.count += other.count
        self.nonfinite += other.nonfinite

    def finite_flag(self) -> torch.Tensor:
        if self.sumsq is None:
            return torch.zeros((), dtype=torch.bool)
        return ~torch.isfinite(self.sumabs if self.magnitudes else self.sumsq)

    @property
    def device(self) -> torch.device:
        """Where the sums are (a started summary)."""
        return self.sumsq.device

    @staticmethod
    def square_terms(summaries: Sequence[GradientSummary]) -> torch.Tensor:
        """As ``TensorSummary.square_terms``, for these gradients (see _widened)."""
        sumsq = torch.stack([g.sumsq for g in summaries])
        counts = torch.tensor([g.count for g in summaries], dtype=sumsq.dtype, device=sumsq.device)
        zero = sumsq.new_zeros(())
        totals = torch.stack([g.sumabs if g.magnitudes else zero for g in summaries])
        # No extremes are kept for gradients: the rms bounds the largest from below (an
        # infinite rms of finite values, an overflow, included), and so does the mean
        # magnitude where it is kept, which stays nonzero when every square underflowed.
        # (A tiny output gradient shows in its layer's parameter gradients.)
        largest = torch.maximum(torch.sqrt(sumsq / counts), totals / counts)
        return torch.stack([largest, sumsq, totals])

    def finalize(self) -> GradientStats | None:
        if self.count == 0:
            return None
        sumsq = float(self.sumsq)
        return GradientStats(
            count=self.count,
            rms=math.sqrt(sumsq / self.count) if sumsq >= 0 else math.nan,
            mean_abs=float(self.sumabs) / self.count if self.magnitudes else None,
            nonfinite=self.nonfinite,
        )


_ONE_DOT = 1 << 16
_DOT_ROW = 1 << 14
"""BLAS accumulates a dot product in the input dtype, on some CPUs nearly sequentially: a
float32 dot of a million values was off by up to 3.6e-6 (AMD EPYC, MKL). Up to _ONE_DOT
values one dot stays within ~2e-7; beyond, one batched product takes partial dots of
_DOT_ROW values (within ~1e-7, summed in float64), and from a million values on it is
faster than one dot was (137 -> 100 us at 1M values, 644 -> 479 us at 4M, on that CPU)."""


def _sum_of_squares(g: torch.Tensor) -> torch.Tensor:
    """sum(g²) reading g once and writing nothing: a weight's gradient can be as large
    as the weight, and squaring it into a buffer first costs three passes instead of one."""
    flat = _flat(g)
    if flat.numel() <= _ONE_DOT:
        return torch.dot(flat, flat)
    whole = flat.numel() - flat.numel() % _DOT_ROW
    rows = flat[:whole].view(-1, 1, _DOT_ROW)
    total = torch.bmm(rows, rows.transpose(1, 2)).sum(dtype=torch.float64)
    tail = flat[whole:]
    return total + torch.dot(tail, tail) if tail.numel() else total


def shape_fan_in(shape: Sequence[int]) -> int | None:
    """Inputs feeding one output unit, as torch.nn.init counts them (None below 2-D)."""
    if len(shape) < 2:
        return None
    return int(shape[1] * math.prod(shape[2:]))


class ParameterSummary:
    """One parameter: its first value, the sums of deviations from it (which sits inside
    the values, so the spread survives even for all-equal weights) and of their squares,
    and the extremes, read on its device.

    Parameters do not change during a run, so they are reduced when first asked for, at
    its end: ``reduce_all`` takes every float32 parameter in CPU memory in one call of the
    compiled kernel, as a few small operations per parameter cost more than its pass. Others
    take four passes each; Welford's ``std_mean`` costs several times more. Non-finite
    values are counted only when the sums show there are some.
    """

    def __init__(
        self,
        name: str,
        p: torch.Tensor,
        scratch: dict | None = None,
        precise: bool = False,
        fan_in: int | None = None,
    ) -> None:
        p = _widened(p.detach(), precise)
        self.name, self.shape = name, tuple(p.shape)
        self.fan_in = fan_in if fan_in is not None else shape_fan_in(self.shape)
        self.empty = p.numel() == 0 or not p.is_floating_point()
        self._tensor = p
        self._scratch = {} if scratch is None else scratch
        self._values: torch.Tensor | None = None

    @property
    def values(self) -> torch.Tensor | None:
        """(first value, sum of deviations, sum of their squares, min, max) in float64;
        None for a parameter with no floating-point values."""
        if self._values is None and not self.empty:
            ParameterSummary.reduce_all([self])
        return self._values

    @staticmethod
    def reduce_all(summaries: Sequence[ParameterSummary]) -> None:
        """Reduce every summary not reduced yet: those the kernel takes, in one call."""
        waiting = [s for s in summaries if s._values is None and not s.empty]
        flats = [s._tensor.reshape(-1) for s in waiting]
        compiled = [i for i, flat in enumerate(flats) if kernel.accepts(flat)]
        if compiled:
            values = kernel.parameter_values([flats[i] for i in compiled])
            for i, row in zip(compiled, values):
                waiting[i]._values = row
        for summary, flat in zip(waiting, flats):
            if summary._values is None:
                summary._values = _parameter_values(flat, summary._scratch)

    @property
    def device(self) -> torch.device:
        """Where the parameter is, and its summary's values."""
        return self._tensor.device

    @staticmethod
    def square_terms(summaries: Sequence[ParameterSummary]) -> torch.Tensor:
        """As ``TensorSummary.square_terms``, for these parameters."""
        values = torch.stack([p.values for p in summaries])  # (shift, dsum, dsumsq, lo, hi)
        extremes = values[:, 3:].abs()
        largest = torch.where(torch.isfinite(extremes), extremes, 0).amax(1)
        return torch.stack([largest, values[:, 2], values[:, 1]])

    def finalize(self) -> ParameterStats | None:
        if self.values is None:
            return None
        shift, dsum, dsumsq, lo, hi = self.values.tolist()
        n = self._tensor.numel()
        nonfinite = 0
        if not all(math.isfinite(v) for v in (dsum, dsumsq, lo, hi)):
            nonfinite = int((~torch.isfinite(self._tensor)).sum())
        d_mean = dsum / n
        return ParameterStats(
            name=self.name,
            shape=self.shape,
            mean=shift + d_mean,
            std=math.sqrt(max(dsumsq / n - d_mean * d_mean, 0.0)) if nonfinite == 0 else math.nan,
            min=lo,
            max=hi,
            fan_in=self.fan_in,
            nonfinite=nonfinite,
        )


def _parameter_values(flat: torch.Tensor, scratch: dict) -> torch.Tensor:
    """``ParameterSummary.values`` of a flat tensor, in PyTorch's operations."""
    d = torch.sub(flat, flat[0], out=_workspace(scratch, flat))
    dsum = d.sum()
    dsumsq = d.mul_(d).sum()
    lo, hi = torch.aminmax(flat)
    return torch.stack([flat[0], dsum, dsumsq, lo, hi]).to(torch.float64)


@dataclass(frozen=True, slots=True)
class LayerStats:
    """Everything measured about one layer, in plain host numbers."""

    name: str
    type: str
    family: str
    functional: bool
    calls: int
    activation: Distribution | None
    output_grad: GradientStats | None
    param_grad: GradientStats | None
    parameters: tuple[ParameterStats, ...]
    buffer_nonfinite: int
    input_from: str | None = None  # see LayerInfo


@dataclass(frozen=True, slots=True)
class RunStats:
    """The stats stage's result: every layer in execution order, plus the probe's
    float inputs (units = features or channels) and the model's primary output."""

    layers: tuple[LayerStats, ...]
    input: Distribution | None
    output: Distribution | None
    output_argmax: tuple[int, ...] | None
    sample_size: int


class _LayerState:
    __slots__ = (
        "activation",
        "buffers_nonfinite",
        "calls",
        "info",
        "output_grad",
        "param_grad",
        "parameters",
    )

    def __init__(
        self, info: LayerInfo, sampler: Sampler, scratch: dict, parameters, buffers, precise: bool
    ) -> None:
        self.info = info
        self.calls = 0
        self.activation = TensorSummary(
            sampler,
            activity=info.family in ACTIVITY_FAMILIES,
            saturation=info.saturation,
            scratch=scratch,
            precise=precise,
        )
        self.output_grad = GradientSummary(scratch=scratch, precise=precise)
        self.param_grad = GradientSummary(sampler, scratch=scratch, precise=precise)
        self.parameters = [
            ParameterSummary(n, p, scratch, precise, dict(info.fan_ins).get(n))
            for n, p in parameters.items()
        ]
        self.buffers_nonfinite = [
            (~torch.isfinite(b)).sum() for b in buffers.values() if b.is_floating_point()
        ]


class StatsCollector:
    """The Observer of a run: one summary per layer, merged per batch and per rank.

    Squares are taken in float32 (or wider), which holds magnitudes within SQUARE_RANGE.
    A run that saw values outside it says so (``out_of_square_range``), and the engine
    runs again with ``precise=True``, taking squares in float64: exact for every finite
    value, and paid for only by models that need it.
    """

    def __init__(
        self,
        sample_size: int = DEFAULT_SAMPLE_SIZE,
        seed: int = 0,
        precise: bool = False,
        batches: int | None = None,
    ) -> None:
        self.sampler = Sampler(sample_size, seed, batches)
        self.precise = precise
        self.scratch: dict = {}
        self.layers: dict[str, _LayerState] = {}
        self.input = TensorSummary(self.sampler, scratch=self.scratch, precise=precise)
        self.output = TensorSummary(self.sampler, scratch=self.scratch, precise=precise)
        self.argmax: torch.Tensor | None = None
        # Each tensor summarised in this batch, by id: (weak reference, version, unit
        # axis, summary, its update count), so a layer whose output is that tensor
        # again (an eval-mode Dropout) copies the results instead of reducing it twice.
        self._summarised: dict[int, tuple] = {}

    def on_layer(
        self,
        layer: LayerInfo,
        parameters: Mapping[str, torch.Tensor],
        buffers: Mapping[str, torch.Tensor],
    ) -> None:
        self.layers[layer.name] = _LayerState(
            layer, self.sampler, self.scratch, parameters, buffers, self.precise
        )

    def on_activation(self, layer: LayerInfo, output: torch.Tensor, unit_dim: int) -> None:
        state = self.layers[layer.name]
        state.calls += 1
        summary = state.activation
        summary.update(output, unit_dim, self._summarised_as_is(output, unit_dim))
        if not output.is_inference():  # inference tensors keep no version counter
            self._summarised[id(output)] = (
                weakref.ref(output), output._version, unit_dim, summary, summary.updates
            )  # fmt: skip

    def _summarised_as_is(self, output: torch.Tensor, unit_dim: int) -> TensorSummary | None:
        """The summary whose last batch was ``output`` itself, unchanged since."""
        entry = self._summarised.get(id(output))
        if entry is None:
            return None
        ref, version, dim, summary, updates = entry
        if ref() is not output or dim != unit_dim or summary.updates != updates:
            return None
        return summary if output._version == version else None

    def on_output_grad(self, layer: LayerInfo, grad: torch.Tensor) -> None:
        self.layers[layer.name].output_grad.update([grad])

    def on_param_grads(self, layer: LayerInfo, grads: Sequence[torch.Tensor]) -> None:
        self.layers[layer.name].param_grad.update(grads)

    def on_input(self, inputs: Sequence[torch.Tensor]) -> None:
        self._summarised.clear()  # a new batch
        for tensor in inputs:
            self.input.update(tensor, 1 if tensor.dim() >= 2 else 0)

    def on_output(self, output: torch.Tensor) -> None:
        self.output.update(output, output.dim() - 1 if output.dim() else 0)
        if output.dim() == 2 and output.shape[1] > 1:
            wins = torch.bincount(output.argmax(dim=1), minlength=output.shape[1])
            self.argmax = wins if self.argmax is None else self.argmax + wins

    # -- non-finite values ----------------------------------------------------------------

    def saw_nonfinite(self) -> bool:
        """One host read per device: did any activation, gradient or input hold NaN or Inf?"""
        flags = [self.input.finite_flag(), self.output.finite_flag()]
        for state in self.layers.values():
            flags += [state.activation.finite_flag(), state.output_grad.finite_flag()]
        return _any_flag(flags)

    def out_of_square_range(self) -> bool:
        """One host read per device: did float32 squares fail some value (SQUARE_RANGE)?"""
        if self.precise:
            return False
        activations, gradients, parameters = [self.input, self.output], [], []
        for state in self.layers.values():
            activations.append(state.activation)
            gradients += [state.output_grad, state.param_grad]
            parameters += state.parameters
        ParameterSummary.reduce_all(parameters)
        kinds = (
            (TensorSummary, [a for a in activations if a.unit_sum is not None]),
            (GradientSummary, [g for g in gradients if g.sumsq is not None]),
            (ParameterSummary, [p for p in parameters if not p.empty]),
        )
        # Each kind's square_terms takes all of a device's summaries of that kind at once:
        # a handful of operations rather than a handful per summary (a model of 400 small
        # layers has over a thousand), then one host read per device.
        terms: dict[torch.device, list[torch.Tensor]] = {}
        for kind, summaries in kinds:
            for device, group in _by_device(summaries).items():
                terms.setdefault(device, []).append(kind.square_terms(group))
        return any(
            bool(_outside_square_range(*torch.cat(group, dim=1)).any()) for group in terms.values()
        )

    def add_nonfinite_counts(self, counter: NonfiniteCounter) -> None:
        """Take exact counts from a second, counting-only run over the same batches."""
        self.input.add_nonfinite(counter.total("input"))
        self.output.add_nonfinite(counter.total("output"))
        for name, state in self.layers.items():
            state.activation.add_nonfinite(counter.total(name))
            state.output_grad.nonfinite += counter.total(name + "\0grad")

    # -- combining and finishing ------------------------------------------------------------

    def merge(self, other: StatsCollector) -> None:
        """Fold in a collector that saw other batches of the same model."""
        for name, theirs in other.layers.items():
            mine = self.layers.get(name)
            if mine is None:
                self.layers[name] = theirs
                continue
            mine.calls += theirs.calls
            mine.activation.merge(theirs.activation)
            mine.output_grad.merge(theirs.output_grad)
            mine.param_grad.merge(theirs.param_grad)
        self.input.merge(other.input)
        self.output.merge(other.output)
        if other.argmax is not None:
            self.argmax = other.argmax if self.argmax is None else self.argmax + other.argmax

    def finalize(self, order: Sequence[LayerInfo]) -> RunStats:
        ParameterSummary.reduce_all([p for state in self.layers.values() for p in state.parameters])
        layers = []
        for info in order:
            state = self.layers[info.name]
            parameters = tuple(p for p in (s.finalize() for s in state.parameters) if p)
            layers.append(
                LayerStats(
                    name=info.name,
                    type=info.type,
                    family=info.family,
                    functional=info.functional,
                    calls=state.calls,
                    activation=state.activation.finalize(),
                    output_grad=state.output_grad.finalize(),
                    param_grad=state.param_grad.finalize(),
                    parameters=parameters,
                    buffer_nonfinite=int(sum(int(n) for n in state.buffers_nonfinite)),
                    input_from=info.input_from,
                )
            )
        return RunStats(
            layers=tuple(layers),
            input=self.input.finalize(),
            output=self.output.finalize(),
            output_argmax=None if self.argmax is None else tuple(self.argmax.tolist()),
            sample_size=self.sampler.sample_size,
        )


def _any_flag(flags: Sequence[torch.Tensor]) -> bool:
    """Whether any device bool is True: one host read per device the flags are on, not
    one per flag (each read waits for the device)."""
    return any(bool(torch.stack(group).any()) for group in _by_device(flags).values())


class _HasDevice(Protocol):
    @property
    def device(self) -> torch.device: ...


_OnDevice = TypeVar("_OnDevice", bound=_HasDevice)


def _by_device(items: Sequence[_OnDevice]) -> dict[torch.device, list[_OnDevice]]:
    """``items`` (tensors or started summaries) grouped by the device they are on, to be
    read once per device."""
    groups: dict[torch.device, list[_OnDevice]] = {}
    for item in items:
        groups.setdefault(item.device, []).append(item)
    return groups


class NonfiniteCounter:
    """An Observer that only counts NaN and Inf values, per layer, exactly.

    Counting costs a full pass per tensor, so it runs only after the main run found
    a non-finite value somewhere.
    """

    def __init__(self) -> None:
        self.counts: dict[str, list[torch.Tensor]] = {}

    def total(self, key: str) -> int:
        return int(sum(int(c) for c in self.counts.get(key, ())))

    def _count(self, key: str, t: torch.Tensor) -> None:
        self.counts.setdefault(key, []).append((~torch.isfinite(t.detach())).sum())

    def on_layer(self, layer, parameters, buffers) -> None:
        pass

    def on_activation(self, layer: LayerInfo, output: torch.Tensor, unit_dim: int) -> None:
        self._count(layer.name, output)

    def on_output_grad(self, layer: LayerInfo, grad: torch.Tensor) -> None:
        self._count(layer.name + "\0grad", grad)

    def on_param_grads(self, layer, grads) -> None:
        pass

    def on_input(self, inputs: Sequence[torch.Tensor]) -> None:
        for tensor in inputs:
            self._count("input", tensor)

    def on_output(self, output: torch.Tensor) -> None:
        self._count("output", output)
