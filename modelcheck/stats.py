"""Streaming, mergeable per-layer statistics: the stats stage.

Each summary keeps a few small tensors on the model's device. ``update`` folds one
batch in with fused reductions and no host synchronisation; ``merge`` combines two
summaries exactly (two batches, or two ``torch.distributed`` ranks); ``finalize`` moves
the numbers to the host once, at the end, and returns plain frozen dataclasses.

What rules decide on is exact over every value: counts, per-unit sums and sums of
squares (accumulated in float64), extremes, per-unit activity and saturation. Higher
moments, zero counts of non-ReLU layers, histograms and quantiles come from a seeded
sample of at most ``sample_size`` values per batch; they are exact whenever a layer's
batch fits in the sample, and ``sample_size`` in the result says how many values they
rest on. Memory does not grow with the number of probe samples.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from modelcheck.capture import LayerInfo

DEAD_BELOW = 0.01
"""A ReLU, GELU or SiLU unit is dead when it is active (> 0) on fewer than this fraction
of positions."""

SATURATED_FROM = 0.95
"""A bounded unit is saturated when it sits in its flat region on at least this fraction."""

HISTOGRAM_BINS = 50
QUANTILE_STEPS = 100
DEFAULT_SAMPLE_SIZE = 16_384
RESERVOIR_SIZE = 4_096
"""Values per layer kept for histograms and quantiles: plenty for 50 bins and 101 quantiles."""

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
    sample_size: int


@dataclass(frozen=True, slots=True)
class GradientStats:
    """Root mean square and mean magnitude of a gradient over every batch."""

    count: int
    rms: float
    mean_abs: float
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


def _workspace(cache: dict, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A reusable scratch tensor shaped like ``like``: a fresh large allocation per
    layer costs page faults comparable to the reduction itself."""
    dtype = dtype or like.dtype
    key = (dtype, like.device)
    flat = cache.get(key)
    if flat is None or flat.numel() < like.numel():
        flat = torch.empty(like.numel(), dtype=dtype, device=like.device)
        cache[key] = flat
    return flat[: like.numel()].view(like.shape)


def _three_axes(x: torch.Tensor, unit_dim: int) -> torch.Tensor:
    """View ``x`` as (outer, units, inner) so per-unit reductions run over axes 0 and 2."""
    shape = x.shape
    outer = math.prod(shape[:unit_dim])
    inner = math.prod(shape[unit_dim + 1 :])
    return x.reshape(outer, shape[unit_dim], inner)


# Magnitudes whose float32 squares (and sums of them) stay normal and finite, with room
# for sums over many values: beyond them a summary is recomputed in float64.
SQUARE_RANGE = (1e-18, 1e18)


def _widened(x: torch.Tensor, precise: bool) -> torch.Tensor:
    """``x`` in the dtype its squares are taken in: float64 when ``precise``, and at
    least float32 (squares of half values overflow above 256)."""
    if precise and x.is_floating_point():
        return x.to(torch.float64)
    if x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
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


def _per_unit_sum(x3: torch.Tensor) -> torch.Tensor:
    # Reduce the contiguous inner axis in the input dtype (torch sums it pairwise),
    # then accumulate the short outer axis in float64.
    return x3.sum(dim=2).to(torch.float64).sum(dim=0)


class MomentSample:
    """Central moments to the fourth of a growing sample, merged exactly (Pébay 2008)."""

    __slots__ = ("m2", "m3", "m4", "mean", "n")

    def __init__(self, device: torch.device) -> None:
        zero = torch.zeros((), dtype=torch.float64, device=device)
        self.n = 0
        self.mean, self.m2, self.m3, self.m4 = zero, zero.clone(), zero.clone(), zero.clone()

    @classmethod
    def of(cls, values: torch.Tensor) -> MomentSample:
        """Moments of a 1-D float64 tensor, computed centred for accuracy."""
        sample = cls(values.device)
        if values.numel():
            sample.n = values.numel()
            sample.mean = values.mean()
            d = values - sample.mean
            d2 = d * d
            sample.m2, sample.m3, sample.m4 = d2.sum(), (d2 * d).sum(), (d2 * d2).sum()
        return sample

    def merge(self, other: MomentSample) -> None:
        if other.n == 0:
            return
        if self.n == 0:
            self.n, self.mean, self.m2, self.m3, self.m4 = (
                other.n,
                other.mean,
                other.m2,
                other.m3,
                other.m4,
            )
            return
        na, nb = self.n, other.n
        n = na + nb
        delta = other.mean - self.mean
        d_n = delta / n
        m4 = (
            self.m4
            + other.m4
            + delta * d_n**3 * na * nb * (na * na - na * nb + nb * nb)
            + 6 * d_n**2 * (na * na * other.m2 + nb * nb * self.m2)
            + 4 * d_n * (na * other.m3 - nb * self.m3)
        )
        m3 = (
            self.m3
            + other.m3
            + delta * d_n**2 * na * nb * (na - nb)
            + 3 * d_n * (na * other.m2 - nb * self.m2)
        )
        self.m2 = self.m2 + other.m2 + delta * d_n * na * nb
        self.m3, self.m4 = m3, m4
        self.mean = self.mean + d_n * nb
        self.n = n

    def shape_moments(self) -> tuple[float | None, float | None]:
        """(skewness, excess kurtosis) as scipy.stats computes them with bias=True."""
        n, m2, mean = self.n, float(self.m2), float(self.mean)
        # Values equal up to rounding have no shape: their spread is float noise.
        if n < 2 or not math.isfinite(m2) or m2 / n <= (1e-12 * mean) ** 2 or m2 <= 0:
            return None, None
        # Divide step by step: m2**1.5 and m2**2 underflow for tiny values.
        root = math.sqrt(m2)
        skew = float(self.m3) / root / root / root * math.sqrt(n)
        kurt = float(self.m4) / m2 / m2 * n - 3.0
        return _finite_or_none(skew), _finite_or_none(kurt)


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


class Reservoir:
    """A bounded weighted sample of values for histograms and quantiles.

    Each kept value carries the key log(u)/w (Efraimidis-Spirakis); merging keeps the
    largest keys, so batches and ranks combine without growing. Nothing is dropped
    while the total stays within the capacity, which makes small probes exact.
    """

    __slots__ = ("capacity", "keys", "values")

    def __init__(self, capacity: int, device: torch.device) -> None:
        self.capacity = capacity
        self.values = torch.empty(0, dtype=torch.float64, device=device)
        self.keys = torch.empty(0, dtype=torch.float64, device=device)

    def add(self, values: torch.Tensor, keys: torch.Tensor) -> None:
        self.values = torch.cat([self.values, values])
        self.keys = torch.cat([self.keys, keys])
        if self.values.numel() > self.capacity:
            kept = torch.topk(self.keys, self.capacity, sorted=False).indices
            self.values, self.keys = self.values[kept], self.keys[kept]

    def merge(self, other: Reservoir) -> None:
        self.add(other.values, other.keys)


class Sampler:
    """Seeded choice of which values of a batch enter the moment sample and reservoir.

    The flat positions are drawn once per tensor size and reused, so the sample costs
    one gather per batch and does not depend on which rank sees which batch.
    """

    def __init__(self, sample_size: int = DEFAULT_SAMPLE_SIZE, seed: int = 0) -> None:
        self.sample_size = sample_size
        self.seed = seed
        self._positions: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._generators: dict[torch.device, torch.Generator] = {}

    def take(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(float64 sample of x, how many values each sampled value stands for)."""
        flat = x.reshape(-1)
        if flat.numel() <= self.sample_size:
            return flat.to(torch.float64), 1.0
        key = (flat.numel(), flat.device)
        positions = self._positions.get(key)
        if positions is None:
            gen = torch.Generator(device=flat.device).manual_seed(self.seed + flat.numel())
            drawn = torch.randint(
                flat.numel(), (self.sample_size,), generator=gen, device=flat.device
            )
            # Unsorted, so any prefix of the sample is itself a uniform sample.
            positions = self._positions[key] = drawn
        return flat[positions].to(torch.float64), flat.numel() / self.sample_size

    def keys(self, n: int, weight: float, device: torch.device) -> torch.Tensor:
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        u = torch.rand(n, dtype=torch.float64, generator=gen, device=device)
        return torch.log(u.clamp_min(1e-300)) / weight


class TensorSummary:
    """Everything modelcheck keeps about one stream of tensors (a layer's outputs).

    ``unit_dim`` picks the axis whose entries are units (Linear features, Conv channels);
    every other axis counts as positions. ``activity`` tracks, per unit, how often it is
    positive (ReLU family); ``saturation`` = (low, high) counts values at or beyond the
    flat regions of a bounded activation.
    """

    def __init__(
        self,
        sampler: Sampler,
        *,
        activity: bool = False,
        saturation: tuple[float, float] | None = None,
        precise: bool = False,
    ) -> None:
        self.sampler = sampler
        self.activity = activity
        self.saturation = saturation
        self.precise = precise
        self.count = 0
        self.units = 0
        self.unit_sum: torch.Tensor | None = None
        self.unit_sumsq: torch.Tensor | None = None
        self.unit_min: torch.Tensor | None = None
        self.unit_max: torch.Tensor | None = None
        self.unit_active: torch.Tensor | None = None
        self.unit_saturated: torch.Tensor | None = None
        self.nonfinite = 0
        self.moments: MomentSample | None = None
        self.sample_zeros: torch.Tensor | None = None
        self.reservoir: Reservoir | None = None
        self._scratch: dict = {}

    # -- streaming --------------------------------------------------------------------

    def update(self, x: torch.Tensor, unit_dim: int) -> None:
        """Fold one batch in: a handful of reductions, no host synchronisation."""
        x = _widened(x.detach(), self.precise)
        if x.dim() == 0:
            x, unit_dim = x.reshape(1), 0
        x3 = _three_axes(x, unit_dim)
        part = self._batch_part(x3)
        if self.count == 0:
            self._adopt(part, x3)
        else:
            self._absorb(part)
        sample, weight = self.sampler.take(x)
        self.moments.merge(MomentSample.of(sample))
        self.sample_zeros = self.sample_zeros + (sample == 0).sum()
        kept = sample[: self.reservoir.capacity]
        weight *= sample.numel() / kept.numel()
        self.reservoir.add(kept, self.sampler.keys(kept.numel(), weight, kept.device))

    def _batch_part(self, x3: torch.Tensor) -> dict[str, torch.Tensor | int]:
        squares = torch.mul(x3, x3, out=_workspace(self._scratch, x3))
        part: dict[str, torch.Tensor | int] = {
            "count": x3.numel(),
            "units": x3.shape[1],
            "sum": _per_unit_sum(x3),
            "sumsq": _per_unit_sum(squares),
            "min": x3.amin(dim=(0, 2)).to(torch.float64),
            "max": x3.amax(dim=(0, 2)).to(torch.float64),
        }
        if self.activity:
            # sign() counts positives exactly for non-negative outputs; anything
            # negative (a leaky variant) is subtracted out by the clamp.
            signs = torch.sign(x3, out=_workspace(self._scratch, x3)).clamp_(min=0)
            part["active"] = _per_unit_sum(signs)
        if self.saturation is not None:
            part["saturated"] = self._saturated_per_unit(x3)
        return part

    def _saturated_per_unit(self, x3: torch.Tensor) -> torch.Tensor:
        low, high = self.saturation
        flags = _workspace(self._scratch, x3, torch.bool)
        if math.isinf(low):
            torch.ge(x3, high, out=flags)
        else:
            centre, half = (high + low) / 2, (high - low) / 2
            shifted = torch.sub(x3, centre, out=_workspace(self._scratch, x3)).abs_()
            torch.ge(shifted, half, out=flags)
        return flags.sum(dim=2, dtype=torch.int32).sum(dim=0, dtype=torch.float64)

    def _adopt(self, part: dict, x3: torch.Tensor) -> None:
        device = x3.device
        self.count, self.units = part["count"], part["units"]
        self.unit_sum, self.unit_sumsq = part["sum"], part["sumsq"]
        self.unit_min, self.unit_max = part["min"], part["max"]
        self.unit_active = part.get("active")
        self.unit_saturated = part.get("saturated")
        self.moments = MomentSample(device)
        self.sample_zeros = torch.zeros((), dtype=torch.int64, device=device)
        self.reservoir = Reservoir(min(RESERVOIR_SIZE, self.sampler.sample_size), device)

    def _absorb(self, part: dict) -> None:
        if part["units"] != self.units:
            # A module called with differently shaped inputs: keep only layer totals.
            part = _collapse_units(part)
            self._collapse_units()
        self.count += part["count"]
        self.unit_sum = self.unit_sum + part["sum"]
        self.unit_sumsq = self.unit_sumsq + part["sumsq"]
        self.unit_min = torch.minimum(self.unit_min, part["min"])
        self.unit_max = torch.maximum(self.unit_max, part["max"])
        if self.unit_active is not None:
            self.unit_active = self.unit_active + part["active"]
        if self.unit_saturated is not None:
            self.unit_saturated = self.unit_saturated + part["saturated"]

    def _collapse_units(self) -> None:
        state = {
            "units": self.units,
            "sum": self.unit_sum,
            "sumsq": self.unit_sumsq,
            "min": self.unit_min,
            "max": self.unit_max,
        }
        if self.unit_active is not None:
            state["active"] = self.unit_active
        if self.unit_saturated is not None:
            state["saturated"] = self.unit_saturated
        state = _collapse_units(state)
        self.units = 1
        self.unit_sum, self.unit_sumsq = state["sum"], state["sumsq"]
        self.unit_min, self.unit_max = state["min"], state["max"]
        self.unit_active = state.get("active")
        self.unit_saturated = state.get("saturated")

    def add_nonfinite(self, count: int) -> None:
        self.nonfinite += count

    def merge(self, other: TensorSummary) -> None:
        """Fold another summary of the same stream in (another batch range or rank)."""
        if other.count == 0:
            return
        if self.count == 0:
            for name in _MERGED_FIELDS:
                setattr(self, name, getattr(other, name))
            self.moments, self.reservoir = _copy_moments(other.moments), _copy_res(other.reservoir)
            return
        part = {
            "count": other.count,
            "units": other.units,
            "sum": other.unit_sum,
            "sumsq": other.unit_sumsq,
            "min": other.unit_min,
            "max": other.unit_max,
            "active": other.unit_active,
            "saturated": other.unit_saturated,
        }
        self._absorb(part)
        self.nonfinite += other.nonfinite
        self.moments.merge(other.moments)
        self.sample_zeros = self.sample_zeros + other.sample_zeros
        self.reservoir.merge(other.reservoir)

    def range_flag(self) -> torch.Tensor:
        """A device bool that is True when float32 squares could not hold these values."""
        if self.unit_sum is None or self.precise:
            return torch.zeros((), dtype=torch.bool)
        extremes = torch.cat([self.unit_min, self.unit_max]).abs()
        largest = torch.where(torch.isfinite(extremes), extremes, 0).max()
        return _outside_square_range(largest, self.unit_sumsq.sum(), self.unit_sum.sum())

    def finite_flag(self) -> torch.Tensor:
        """A device bool that is True when some value seen so far was NaN or infinite.

        A non-finite value poisons its unit's sum; reading the flag once at the end
        avoids counting non-finite values on every batch.
        """
        if self.unit_sum is None:
            return torch.zeros((), dtype=torch.bool)
        return ~torch.isfinite(self.unit_sum).all()

    # -- result -----------------------------------------------------------------------

    def finalize(self) -> Distribution | None:
        if self.count == 0:
            return None
        host = _to_host(self)
        positions = self.count / self.units
        unit_mean = host["sum"] / positions
        unit_var = np.maximum(host["sumsq"] / positions - unit_mean**2, 0.0)
        unit_var = _within_half_range(unit_var, host["min"], host["max"])
        mean = float(host["sum"].sum() / self.count)
        mean_square = float(host["sumsq"].sum() / self.count)
        skewness, kurtosis = self.moments.shape_moments()
        sample_n = self.moments.n
        values = host["sample"]
        active = saturated = None
        zero_fraction = float(host["sample_zeros"]) / sample_n if sample_n else 0.0
        if host.get("active") is not None:
            active = host["active"] / positions
            zero_fraction = 1.0 - float(host["active"].sum()) / self.count
        if host.get("saturated") is not None:
            saturated = host["saturated"] / positions
        finite_values = values[np.isfinite(values)]
        lo, hi = float(host["min"].min()), float(host["max"].max())
        variance = float(_within_half_range(np.float64(mean_square - mean * mean), lo, hi))
        return Distribution(
            count=self.count,
            units=self.units,
            mean=mean,
            std=math.sqrt(max(variance, 0.0)),
            rms=math.sqrt(mean_square),
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
            histogram=_histogram(finite_values, lo, hi, self.count - self.nonfinite),
            quantiles=_quantiles(finite_values, lo, hi),
            sample_size=min(sample_n, self.count),
        )


def _within_half_range(variance: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Cap a variance at the square of half the range, which no distribution exceeds.

    ``E[x²] - E[x]²`` loses the variance of values that hardly vary to rounding (float32
    squares keep 7 digits): a constant layer would get a small positive std. The exact
    extremes bound it, and make it exactly 0 when every value is the same.
    """
    half = (np.asarray(hi, dtype=np.float64) - np.asarray(lo, dtype=np.float64)) / 2
    with np.errstate(over="ignore", invalid="ignore"):
        capped = np.minimum(variance, half * half)
    return np.where(np.isfinite(half), capped, variance)


_MERGED_FIELDS = (
    "count",
    "units",
    "unit_sum",
    "unit_sumsq",
    "unit_min",
    "unit_max",
    "unit_active",
    "unit_saturated",
    "nonfinite",
    "sample_zeros",
)


def _copy_moments(m: MomentSample) -> MomentSample:
    copy = MomentSample(m.mean.device)
    copy.merge(m)
    return copy


def _copy_res(r: Reservoir) -> Reservoir:
    copy = Reservoir(r.capacity, r.values.device)
    copy.merge(r)
    return copy


def _collapse_units(part: dict) -> dict:
    collapsed = dict(part, units=1)
    for key in ("sum", "sumsq", "active", "saturated"):
        if part.get(key) is not None:
            collapsed[key] = part[key].sum().reshape(1)
    collapsed["min"] = part["min"].min().reshape(1)
    collapsed["max"] = part["max"].max().reshape(1)
    return collapsed


def _to_host(s: TensorSummary) -> dict[str, np.ndarray]:
    """Move every device tensor of a summary to the host in one go."""
    tensors = {
        "sum": s.unit_sum,
        "sumsq": s.unit_sumsq,
        "min": s.unit_min,
        "max": s.unit_max,
        "active": s.unit_active,
        "saturated": s.unit_saturated,
        "sample": s.reservoir.values,
        "sample_zeros": s.sample_zeros,
    }
    return {k: None if v is None else v.detach().cpu().numpy() for k, v in tensors.items()}


def _histogram(values: np.ndarray, lo: float, hi: float, total: int) -> Histogram | None:
    if values.size == 0 or not (math.isfinite(lo) and math.isfinite(hi)):
        return None
    counts, edges = np.histogram(values, bins=HISTOGRAM_BINS, range=(lo, hi) if hi > lo else None)
    scale = total / values.size
    return Histogram(edges=tuple(edges.tolist()), counts=tuple((counts * scale).tolist()))


def _quantiles(values: np.ndarray, lo: float, hi: float) -> tuple[float, ...] | None:
    if values.size == 0:
        return None
    q = np.quantile(values, np.linspace(0.0, 1.0, QUANTILE_STEPS + 1))
    # The exact extremes are known; the sample's may fall short of them.
    q[0], q[-1] = lo, hi
    return tuple(q.tolist())


class GradientSummary:
    """Running sums of squares and magnitudes of a gradient stream (float64)."""

    def __init__(self, precise: bool = False) -> None:
        self.precise = precise
        self.count = 0
        self.sumsq: torch.Tensor | None = None
        self.sumabs: torch.Tensor | None = None
        self.nonfinite = 0
        self._scratch: dict = {}

    def update(self, grads: Sequence[torch.Tensor]) -> None:
        for g in grads:
            g = _widened(g.detach(), self.precise)
            scratch = _workspace(self._scratch, g)
            sumsq = torch.mul(g, g, out=scratch).sum().to(torch.float64)
            sumabs = torch.abs(g, out=scratch).sum().to(torch.float64)
            self._add(g.numel(), sumsq, sumabs)

    def _add(self, count: int, sumsq: torch.Tensor, sumabs: torch.Tensor) -> None:
        if self.count == 0:
            self.sumsq, self.sumabs = sumsq, sumabs
        else:
            self.sumsq, self.sumabs = self.sumsq + sumsq, self.sumabs + sumabs
        self.count += count

    def merge(self, other: GradientSummary) -> None:
        if other.count:
            self._add(other.count, other.sumsq, other.sumabs)
            self.nonfinite += other.nonfinite

    def finite_flag(self) -> torch.Tensor:
        if self.sumabs is None:
            return torch.zeros((), dtype=torch.bool)
        return ~torch.isfinite(self.sumabs)

    def range_flag(self) -> torch.Tensor:
        """True when float32 squares could not hold these gradients (see _widened)."""
        if self.sumabs is None or self.precise:
            return torch.zeros((), dtype=torch.bool)
        # No extremes are kept for gradients: the mean magnitude bounds them well enough
        # from below, and an infinite sum of finite squares shows an overflow.
        return _outside_square_range(self.sumabs / self.count, self.sumsq, self.sumabs)

    def finalize(self) -> GradientStats | None:
        if self.count == 0:
            return None
        sumsq, sumabs = float(self.sumsq), float(self.sumabs)
        return GradientStats(
            count=self.count,
            rms=math.sqrt(sumsq / self.count) if sumsq >= 0 else math.nan,
            mean_abs=sumabs / self.count,
            nonfinite=self.nonfinite,
        )


def fan_in(shape: Sequence[int]) -> int | None:
    """Inputs feeding one output unit, as torch.nn.init counts them (None below 2-D)."""
    if len(shape) < 2:
        return None
    return int(shape[1] * math.prod(shape[2:]))


class ParameterSummary:
    """One parameter, reduced on its device when first seen and read at the end."""

    def __init__(self, name: str, p: torch.Tensor, precise: bool = False) -> None:
        p = _widened(p.detach(), precise)
        self.name, self.shape = name, tuple(p.shape)
        if p.numel() == 0 or not p.is_floating_point():
            self.values = None
            return
        std, mean = torch.std_mean(p, correction=0)
        self.values = torch.stack(
            [mean, std, p.min(), p.max(), (~torch.isfinite(p)).sum().to(p.dtype)]
        ).to(torch.float64)

    def range_flag(self) -> torch.Tensor:
        if self.values is None:
            return torch.zeros((), dtype=torch.bool)
        mean, std, lo, hi, _ = self.values
        largest = torch.maximum(lo.abs(), hi.abs())
        largest = torch.where(torch.isfinite(largest), largest, 0)
        return _outside_square_range(largest, std * std, mean)

    def finalize(self) -> ParameterStats | None:
        if self.values is None:
            return None
        mean, std, lo, hi, nonfinite = self.values.tolist()
        return ParameterStats(
            name=self.name,
            shape=self.shape,
            mean=mean,
            std=std,
            min=lo,
            max=hi,
            fan_in=fan_in(self.shape),
            nonfinite=int(nonfinite),
        )


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
        self, info: LayerInfo, sampler: Sampler, parameters, buffers, precise: bool
    ) -> None:
        self.info = info
        self.calls = 0
        self.activation = TensorSummary(
            sampler,
            activity=info.family in ACTIVITY_FAMILIES,
            saturation=info.saturation,
            precise=precise,
        )
        self.output_grad = GradientSummary(precise)
        self.param_grad = GradientSummary(precise)
        self.parameters = [ParameterSummary(n, p, precise) for n, p in parameters.items()]
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
        self, sample_size: int = DEFAULT_SAMPLE_SIZE, seed: int = 0, precise: bool = False
    ) -> None:
        self.sampler = Sampler(sample_size, seed)
        self.precise = precise
        self.layers: dict[str, _LayerState] = {}
        self.input = TensorSummary(self.sampler, precise=precise)
        self.output = TensorSummary(self.sampler, precise=precise)
        self.argmax: torch.Tensor | None = None

    def on_layer(
        self,
        layer: LayerInfo,
        parameters: Mapping[str, torch.Tensor],
        buffers: Mapping[str, torch.Tensor],
    ) -> None:
        self.layers[layer.name] = _LayerState(
            layer, self.sampler, parameters, buffers, self.precise
        )

    def on_activation(self, layer: LayerInfo, output: torch.Tensor, unit_dim: int) -> None:
        state = self.layers[layer.name]
        state.calls += 1
        state.activation.update(output, unit_dim)

    def on_output_grad(self, layer: LayerInfo, grad: torch.Tensor) -> None:
        self.layers[layer.name].output_grad.update([grad])

    def on_param_grads(self, layer: LayerInfo, grads: Sequence[torch.Tensor]) -> None:
        self.layers[layer.name].param_grad.update(grads)

    def on_input(self, inputs: Sequence[torch.Tensor]) -> None:
        for tensor in inputs:
            self.input.update(tensor, 1 if tensor.dim() >= 2 else 0)

    def on_output(self, output: torch.Tensor) -> None:
        self.output.update(output, output.dim() - 1 if output.dim() else 0)
        if output.dim() == 2 and output.shape[1] > 1:
            wins = torch.bincount(output.argmax(dim=1), minlength=output.shape[1])
            self.argmax = wins if self.argmax is None else self.argmax + wins

    # -- non-finite values ----------------------------------------------------------------

    def saw_nonfinite(self) -> bool:
        """One host read: did any activation, gradient or input hold NaN or Inf?"""
        flags = [self.input.finite_flag().cpu(), self.output.finite_flag().cpu()]
        for state in self.layers.values():
            flags += [
                state.activation.finite_flag().cpu(),
                state.output_grad.finite_flag().cpu(),
            ]
        return bool(torch.stack(flags).any())

    def out_of_square_range(self) -> bool:
        """One host read: did float32 squares fail some value (see SQUARE_RANGE)?"""
        if self.precise:
            return False
        flags = [self.input.range_flag().cpu(), self.output.range_flag().cpu()]
        for state in self.layers.values():
            flags += [
                state.activation.range_flag().cpu(),
                state.output_grad.range_flag().cpu(),
                state.param_grad.range_flag().cpu(),
                *(p.range_flag().cpu() for p in state.parameters),
            ]
        return bool(torch.stack(flags).any())

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
                )
            )
        return RunStats(
            layers=tuple(layers),
            input=self.input.finalize(),
            output=self.output.finalize(),
            output_argmax=None if self.argmax is None else tuple(self.argmax.tolist()),
            sample_size=self.sampler.sample_size,
        )


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
