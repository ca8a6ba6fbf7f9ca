"""Where a check's time goes: wall-clock timers around its stages, inside real checks.

    python benchmarks/stages.py resnet                       # forward-only, 10 checks
    python benchmarks/stages.py iris --gradients --checks 21
    python benchmarks/stages.py mlp --depth 200 --width 32 --samples 256 --gradients

On a shared VM a whole-check A/B needs ~30 rounds to resolve a 3-5% change; the time of one
stage moves far less. Each check runs after a plain pass of its own, and the medians of the
plain pass, the check and each stage are printed. Stages overlap: the passes over the probe
hold the forward calls and every summary made during the run (parameter summaries and most
activation summaries inside the forward calls, small outputs' right after them); the
activation summaries hold the kernel's reductions and some of the folding of samples, which
finalize does the rest of.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import allocator  # this script's directory is first on sys.path
import baselines
import models

import modelcheck
from modelcheck import capture, engine, kernel, stats

STAGES = (
    (capture, "run", "passes over the probe"),
    (capture, "call_model", "forward calls"),
    (stats.StatsCollector, "on_layer", "parameter summaries"),
    (stats.StatsCollector, "on_activation", "activation summaries"),
    (kernel, "reduce_into", "kernel reductions"),
    (stats.TensorSummary, "_flush_samples", "folding samples"),
    (stats.StatsCollector, "on_output_grad", "output gradients"),
    (stats.StatsCollector, "on_param_grads", "parameter gradients"),
    (stats.StatsCollector, "out_of_square_range", "square-range test"),
    (stats.StatsCollector, "finalize", "finalize"),
    (engine, "_evaluate", "rules"),
)


@contextmanager
def timed(spent: dict[str, float]) -> Iterator[None]:
    """Wrap every stage so that its wall time adds up in ``spent``, for as long as inside."""
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in STAGES]
    for (owner, name, original), (_, _, label) in zip(originals, STAGES):
        setattr(owner, name, _timer(original, label, spent))
    try:
        yield
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


def _timer(function: Callable, label: str, spent: dict[str, float]) -> Callable:
    def run(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            spent[label] = spent.get(label, 0.0) + time.perf_counter() - start

    return run


def _model(args: argparse.Namespace):
    if args.model == "iris":
        return models.iris()
    if args.model == "mlp":
        return models.mlp(depth=args.depth, width=args.width, samples=args.samples or 8192)
    if args.model == "resnet":
        return models.resnet18(samples=args.samples or 256)
    return models.transformer(samples=args.samples or 64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=["iris", "mlp", "resnet", "transformer"])
    parser.add_argument("--samples", type=int, help="probe samples (the benchmark's by default)")
    parser.add_argument("--depth", type=int, default=20, help="MLP blocks")
    parser.add_argument("--width", type=int, default=1024, help="MLP width")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--checks", type=int, default=10)
    parser.add_argument("--gradients", action="store_true", help="full checks, not forward-only")
    args = parser.parse_args()
    allocator.fix_heap()

    model, x = _model(args)
    batches = list(x.split(args.batch_size))
    check = lambda: modelcheck.check(  # noqa: E731
        model, x, batch_size=args.batch_size, gradients=args.gradients
    )
    check()  # warm-up: allocator, rule pack, kernels
    plain, checks, stages = [], [], {label: [] for _, _, label in STAGES}
    for _ in range(args.checks):
        start = time.perf_counter()
        baselines.plain(model, batches, args.gradients)
        plain.append(time.perf_counter() - start)
        spent: dict[str, float] = {}
        with timed(spent):
            start = time.perf_counter()
            check()
            checks.append(time.perf_counter() - start)
        for label in stages:
            stages[label].append(spent.get(label, 0.0))

    def ms(values: list[float]) -> str:
        return f"{statistics.median(values) * 1e3:8.1f} ms"

    ratio = statistics.median(c / p for c, p in zip(checks, plain))
    print(f"{'plain pass':30s}{ms(plain)}")
    print(f"{'check':30s}{ms(checks)}   {ratio:.2f}x (median of {args.checks})")
    for label, values in stages.items():
        print(f"{label:30s}{ms(values)}")


if __name__ == "__main__":
    main()
