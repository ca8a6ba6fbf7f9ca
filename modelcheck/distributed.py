"""Run a check across the ranks of a ``torch.distributed`` group: shard, then merge.

With a process group initialised, each rank runs its own share of the probe batches
(``shard``) and keeps its own summaries; ``merge`` then combines them with collective
operations so that every rank holds the summaries of the whole probe: sums, counts and
squared deviations by ``all_reduce(SUM)`` (after every rank re-expresses its deviations
around the common per-unit mean from a first ``all_reduce``), extremes by
``all_reduce(MAX)``, and the bounded reservoirs by one ``all_gather``. Small metadata
(which layers each rank saw) travels as objects. Rank 0 then evaluates the rules and
the engine hands its report to every rank.

The merge is the stats stage's own merge done by collectives: a 2-rank check equals a
1-process check of the same batches up to float64 rounding (sampled histograms and
quantiles of large probes are drawn independently per rank, so they agree in
distribution, not bit for bit).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from modelcheck.capture import LayerInfo
from modelcheck.errors import ProbeError
from modelcheck.probe import Batch
from modelcheck.stats import (
    GradientSummary,
    Reservoir,
    StatsCollector,
    TensorSummary,
    _LayerState,
    _reshifted,
    _reshifted_part,
)

try:
    import torch.distributed as dist
except ImportError:  # a torch built without distributed support
    dist = None


@dataclass(frozen=True, slots=True)
class Group:
    """The process group a check runs in: this process's rank and the group's size."""

    rank: int
    size: int
    handle: object = None  # the torch ProcessGroup (None: the default group)


@contextmanager
def launched(device: torch.device | None) -> Iterator[torch.device | None]:
    """For the command line under ``torchrun``: join the group the launcher describes.

    torchrun sets RANK, WORLD_SIZE and MASTER_ADDR/PORT; with more than one rank and no
    group yet, this initialises one (NCCL for CUDA, gloo otherwise), gives each rank its
    own GPU (LOCAL_RANK) and tears the group down afterwards. Yields the device to use.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if dist is None or world < 2 or "RANK" not in os.environ or dist.is_initialized():
        yield device
        return
    cuda = device is not None and device.type == "cuda"
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield device
    finally:
        dist.destroy_process_group()


def current_group() -> Group | None:
    """The default process group when one is initialised with more than one rank."""
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    if dist.get_world_size() < 2:
        return None
    return Group(rank=dist.get_rank(), size=dist.get_world_size())


@dataclass(frozen=True, slots=True, eq=False)
class _Shard:
    """Every ``size``-th batch of a probe, starting at ``rank``."""

    batches: Iterable[Batch]
    rank: int
    size: int

    def __iter__(self) -> Iterator[Batch]:
        for index, batch in enumerate(self.batches):
            if index % self.size == self.rank:
                yield batch

    def __len__(self) -> int:
        return max(0, -(-(len(self.batches) - self.rank) // self.size))  # type: ignore[arg-type]


def shard(batches: Iterable[Batch], group: Group, presharded: bool) -> Iterable[Batch]:
    """This rank's batches: round-robin over the probe, unless the probe is already this
    rank's share (a DataLoader over a ``DistributedSampler``)."""
    return batches if presharded else _Shard(batches, group.rank, group.size)


def any_rank(flag: bool, group: Group) -> bool:
    """True on every rank when ``flag`` is True on some rank."""
    value = torch.tensor([1.0 if flag else 0.0], device=_device(group))
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group.handle)
    return bool(value.item())


def sum_ints(values: Sequence[int], group: Group) -> list[int]:
    """Element-wise sums of small integers over the ranks."""
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_device(group))
    dist.all_reduce(tensor, group=group.handle)
    return [int(v) for v in tensor.tolist()]


def broadcast(value: object, group: Group) -> object:
    """Rank 0's ``value`` on every rank (pickled: for the finished report)."""
    box = [value if group.rank == 0 else None]
    dist.broadcast_object_list(box, src=0, group=group.handle)
    return box[0]


def _device(group: Group) -> torch.device:
    # NCCL moves CUDA tensors only; gloo and MPI move CPU tensors.
    if dist.get_backend(group.handle) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# -- merging ---------------------------------------------------------------------------------


def merge(collector: StatsCollector, layers: Sequence[LayerInfo], group: Group) -> list[LayerInfo]:
    """Combine every rank's summaries in place; return the layers in execution order.

    Every rank must call this with its own collector. The order is rank 0's, followed by
    layers only other ranks saw (a data-dependent branch); a rank that missed a layer
    contributes an empty summary of it.
    """
    order = _agree_on_layers(collector, layers, group)
    summaries = [collector.input, collector.output]
    summaries += [collector.layers[info.name].activation for info in order]
    grads = [g for info in order for g in _gradients(collector.layers[info.name])]
    device = collector.output.unit_sum.device  # every rank ran at least one batch
    for summary, units in zip(summaries, _agree_on_units(summaries, group)):
        _prepare(summary, units, device)
    _merge_shifts(summaries, group)
    _merge_sums(collector, order, summaries, grads, group)
    _merge_extremes(summaries, group)
    _merge_reservoirs(summaries, group)
    return order


def _gradients(state: _LayerState) -> tuple[GradientSummary, GradientSummary]:
    return state.output_grad, state.param_grad


def _agree_on_layers(
    collector: StatsCollector, layers: Sequence[LayerInfo], group: Group
) -> list[LayerInfo]:
    seen: list[list[LayerInfo]] = [[] for _ in range(group.size)]
    dist.all_gather_object(seen, list(layers), group=group.handle)
    order: dict[str, LayerInfo] = {}
    for rank_layers in seen:
        for info in rank_layers:
            order.setdefault(info.name, info)
    for info in order.values():
        if info.name not in collector.layers:
            collector.on_layer(info, {}, {})
    return list(order.values())


def _agree_on_units(summaries: list[TensorSummary], group: Group) -> list[int]:
    """Per summary, the unit count every rank will use (1 where ranks disagree)."""
    local = [s.units if s.count else 0 for s in summaries]
    every: list[list[int]] = [[] for _ in range(group.size)]
    dist.all_gather_object(every, local, group=group.handle)
    agreed = []
    for column in zip(*every):
        sizes = {u for u in column if u}
        agreed.append(sizes.pop() if len(sizes) == 1 else (1 if sizes else 0))
    return agreed


def _prepare(summary: TensorSummary, units: int, device: torch.device) -> None:
    """Flush waiting samples; collapse or create state so every rank has ``units`` units."""
    summary.flush()
    if summary.count and summary.units != units:
        summary._collapse_units()
    if summary.count == 0 and units:
        summary.start_empty(units, device)


def _live(summaries: list[TensorSummary]) -> list[TensorSummary]:
    return [s for s in summaries if s.unit_sum is not None]


def _pack(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    if not tensors:
        return torch.zeros(1, dtype=torch.float64, device=device)
    return torch.cat([t.reshape(-1).to(device, torch.float64) for t in tensors])


def _unpack(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    out, start = [], 0
    for t in like:
        out.append(flat[start : start + t.numel()].reshape(t.shape).to(t.device))
        start += t.numel()
    return out


def _merge_shifts(summaries: list[TensorSummary], group: Group) -> None:
    """Re-express every rank's deviations around the common per-unit and sample means."""
    device = _device(group)
    live = _live(summaries)
    parts = []
    for s in live:
        m = s.moments
        parts += [
            torch.tensor([float(s.count), float(m.n)], dtype=torch.float64),
            s.unit_sum,
            (m.shift * m.n + m.sums[0]).reshape(1),
        ]
    flat = _pack(parts, device)
    dist.all_reduce(flat, group=group.handle)
    totals = _unpack(flat, parts)
    for i, s in enumerate(live):
        (count, n), unit_sum, sample_sum = (
            totals[3 * i].tolist(),
            totals[3 * i + 1],
            totals[3 * i + 2],
        )
        if count == 0:
            continue
        mean = unit_sum / (count / s.units)
        if s.count:
            part = _reshifted_part(
                {"count": s.count, "units": s.units, "shift": s.unit_shift, "sum": s.unit_sum,
                 "dsumsq": s.unit_dsumsq},
                mean,
            )  # fmt: skip
            s.unit_dsumsq = part["dsumsq"]
        s.unit_shift = mean.clone()
        m = s.moments
        common = (sample_sum / n).reshape(())
        if m.n:
            m.sums = _reshifted(m.sums, m.n, m.shift - common)
        m.shift = common


def _merge_sums(
    collector: StatsCollector,
    order: list[LayerInfo],
    summaries: list[TensorSummary],
    grads: list[GradientSummary],
    group: Group,
) -> None:
    device = _device(group)
    live = _live(summaries)
    parts: list[torch.Tensor] = []
    for s in live:
        parts += [s.unit_sum, s.unit_dsumsq, s.moments.sums]
        parts += [t for t in (s.unit_active, s.unit_saturated) if t is not None]
        parts.append(torch.tensor([s.count, s.moments.n, s.nonfinite], dtype=torch.float64))
        parts.append(s.sample_nonzero.reshape(1))
    for g in grads:
        parts.append(torch.tensor([g.count, g.nonfinite], dtype=torch.float64))
        parts += [_or_zero(g.sumsq), _or_zero(g.sumabs)]
    parts.append(torch.tensor([collector.layers[i.name].calls for i in order], dtype=torch.float64))
    if collector.argmax is not None:
        parts.append(collector.argmax)
    flat = _pack(parts, device)
    dist.all_reduce(flat, group=group.handle)
    values = iter(_unpack(flat, parts))
    for s in live:
        s.unit_sum, s.unit_dsumsq, s.moments.sums = next(values), next(values), next(values)
        if s.unit_active is not None:
            s.unit_active = next(values)
        if s.unit_saturated is not None:
            s.unit_saturated = next(values)
        count, n, nonfinite = (int(v) for v in next(values).tolist())
        s.count, s.moments.n, s.nonfinite = count, n, nonfinite
        s.sample_nonzero = next(values).reshape(()).round().to(torch.int64)
    for g in grads:
        count, nonfinite = (int(v) for v in next(values).tolist())
        sumsq, sumabs = next(values), next(values)
        if count:
            g.sumsq = sumsq.reshape(())
            g.sumabs = sumabs.reshape(()) if g.magnitudes else None
        g.count, g.nonfinite = count, nonfinite
    for info, calls in zip(order, next(values).tolist()):
        collector.layers[info.name].calls = int(calls)
    if collector.argmax is not None:
        collector.argmax = next(values).round().to(torch.int64)


def _or_zero(t: torch.Tensor | None) -> torch.Tensor:
    return torch.zeros(1, dtype=torch.float64) if t is None else t.reshape(1)


def _merge_extremes(summaries: list[TensorSummary], group: Group) -> None:
    live = _live(summaries)
    parts = [t for s in live for t in (-s.unit_min, s.unit_max)]
    flat = _pack(parts, _device(group))
    dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=group.handle)
    values = _unpack(flat, parts)
    for i, s in enumerate(live):
        s.unit_min, s.unit_max = -values[2 * i], values[2 * i + 1]


def _merge_reservoirs(summaries: list[TensorSummary], group: Group) -> None:
    """All-gather each reservoir, padded to its capacity with keys that never win."""
    device = _device(group)
    live = _live(summaries)
    if not live:
        return
    rows = []
    for s in live:
        values, keys = s.reservoir.contents()
        pad = s.reservoir.capacity - values.numel()
        rows.append(
            torch.cat([values.to(device), torch.zeros(pad, dtype=torch.float64, device=device)])
        )
        rows.append(
            torch.cat(
                [keys.to(device), torch.full((pad,), -math.inf, dtype=torch.float64, device=device)]
            )
        )
    local = torch.cat(rows)
    gathered = [torch.empty_like(local) for _ in range(group.size)]
    dist.all_gather(gathered, local, group=group.handle)
    for s in live:
        s.reservoir = Reservoir(s.reservoir.capacity, s.reservoir.device, s.reservoir.draw)
    for flat in gathered:
        start = 0
        for s in live:
            capacity = s.reservoir.capacity
            values, keys = (
                flat[start : start + capacity],
                flat[start + capacity : start + 2 * capacity],
            )
            start += 2 * capacity
            kept = torch.isfinite(keys) | (keys == math.inf)
            device = s.reservoir.device
            s.reservoir.add(values[kept].to(device), 1.0, keys[kept].to(device))


def check_shards(batches: int, group: Group) -> None:
    """Refuse a probe with fewer batches than ranks: a rank would have nothing to run."""
    counts = [0] * group.size
    counts[group.rank] = batches
    totals = sum_ints(counts, group)
    idle = [rank for rank, count in enumerate(totals) if count == 0]
    if idle:
        raise ProbeError(
            f"the probe gave no batch to rank(s) {idle} of {group.size}: it has fewer batches "
            "than ranks; use a smaller --batch-size or more probe samples"
        )
