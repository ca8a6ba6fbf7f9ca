"""How close a forward-only check can come to a plain forward: the cost of reading each
layer's output once, with next to no Python around it.

    python benchmarks/floor.py                      # the MLP, 4,096 samples, 7 rounds
    python benchmarks/floor.py resnet --rounds 5

Hooks on the modules a check records, in one process, each case timed after a plain
forward of its own (rounds alternate the cases):
- hooks that keep nothing: what a forward hook per layer costs;
- holding each output to the end of the forward, as a check does with small outputs;
- one pass of the compiled kernel over each output inside its hook, while it is in cache,
  or over each held output after the forward: the reduction a check cannot do without,
  called with arguments made once (a check's own call takes ~40 µs of Python around it);
- the check itself, forward-only.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import allocator  # this script's directory is first on sys.path
import baselines
import models
import torch

import modelcheck
from modelcheck import kernel
from modelcheck.capture import recorded_modules
from modelcheck.stats import _three_axes


class _Reducer:
    """One kernel pass over an output, into accumulators kept per width."""

    def __init__(self) -> None:
        self.scratch: dict[int, tuple[torch.Tensor, list[int], torch.Tensor]] = {}

    def __call__(self, out: torch.Tensor) -> None:
        x3 = _three_axes(out, 1)  # (batch, units, positions), as a check views it
        units = x3.shape[1]
        if units not in self.scratch:
            # a shift; sum, dsumsq, active, saturated, then low and high, as a summary keeps them
            totals = torch.zeros(4 * units + 2, dtype=torch.float64)
            rows = [totals[i * units :].data_ptr() for i in range(4)] + [
                totals[4 * units :].data_ptr(),
                totals[4 * units + 1 :].data_ptr(),
            ]
            self.scratch[units] = (torch.zeros(units), rows, totals)
        shift, rows, _ = self.scratch[units]
        kernel.LIBRARY.modelcheck_reduce_f32(
            x3.data_ptr(), *x3.shape, shift.data_ptr(), *rows, None, 0, 0.0, 0.0, None, None, 0,
            None, torch.get_num_threads() if kernel.THREADED else 1,
        )  # fmt: skip


def _hooked(
    model: torch.nn.Module,
    batches: list[torch.Tensor],
    hook: Callable,
    after_forward: Callable[[], None] = lambda: None,
) -> Callable[[], None]:
    def ended(_module, _args, _out) -> None:
        after_forward()

    def run() -> None:
        handles = [m.register_forward_hook(hook) for _, m in recorded_modules(model)]
        handles.append(model.register_forward_hook(ended))  # runs after every other hook
        try:
            baselines.plain(model, batches, gradients=False)
        finally:
            for handle in handles:
                handle.remove()

    return run


def cases(model: torch.nn.Module, x: torch.Tensor, batch_size: int) -> dict[str, Callable]:
    batches = list(x.split(batch_size))
    reduce, held = _Reducer(), []

    def hold(_module, _args, out) -> None:
        held.append(out)

    def reduce_held() -> None:
        for out in held:
            reduce(out)
        held.clear()

    return {
        "plain forward": lambda: baselines.plain(model, batches, gradients=False),
        "hooks that keep nothing": _hooked(model, batches, lambda _m, _a, _o: None),
        "outputs held": _hooked(model, batches, hold, held.clear),
        "one kernel pass in the hook": _hooked(model, batches, lambda _m, _a, out: reduce(out)),
        "one kernel pass, held": _hooked(model, batches, hold, reduce_held),
        "check --no-gradients": lambda: modelcheck.check(
            model, x, batch_size=batch_size, gradients=False
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="mlp", choices=("mlp", "resnet"))
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    allocator.fix_heap()
    if kernel.LIBRARY is None:
        raise SystemExit("the compiled kernel is not built: pip install -e . with a C compiler")
    build = models.mlp if args.model == "mlp" else models.resnet18
    model, x = build(samples=args.samples)
    batch_size = 64
    timed = cases(model, x, batch_size)
    ratios: dict[str, list[float]] = {name: [] for name in timed}
    for run in timed.values():  # warm-up
        run()
    for _ in range(args.rounds):
        for name, run in timed.items():
            start = time.perf_counter()
            baselines.plain(model, list(x.split(batch_size)), gradients=False)
            plain = time.perf_counter() - start
            start = time.perf_counter()
            run()
            ratios[name].append((time.perf_counter() - start) / plain)
    print(f"{args.model}, {x.shape[0]:,} samples, batches of {batch_size}, {args.rounds} rounds")
    for name, values in ratios.items():
        low, high = min(values), max(values)
        print(f"{name:30s} {statistics.median(values):.3f}x  ({low:.2f}-{high:.2f})")


if __name__ == "__main__":
    main()
