"""Compare two source trees of modelcheck on one benchmark model: the A/B behind a change.

    git worktree add /tmp/before HEAD~1
    python benchmarks/compare.py /tmp/before . --model mlp --samples 4096

Each round runs one subprocess per tree, with that tree first on PYTHONPATH, alternating
which tree goes first. A subprocess times the plain pass and the check in turns and reports
the ratio of each check to the plain pass just before it, so every ratio is taken within one
process and a few seconds. This VM's speed drifts by 10-30% within minutes: a difference
shows only when it holds across rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent

BUILDERS = {"mlp": "mlp", "resnet": "resnet18", "transformer": "transformer"}


def worker(tree: str, model_name: str, samples: int, batch_size: int, repeat: int) -> None:
    """Time plain passes and checks in turns; print the ratios as one JSON line."""
    sys.path.insert(0, str(HERE))
    import baselines
    import models

    import modelcheck

    if not Path(modelcheck.__file__).resolve().is_relative_to(Path(tree).resolve()):
        sys.exit(f"compare.py: modelcheck came from {modelcheck.__file__}, not from {tree}")
    model, x = getattr(models, BUILDERS[model_name])(samples=samples)
    batches = list(x.split(batch_size))
    modelcheck.check(model, batches[0], batch_size=batch_size)  # warm-up
    ratios: dict[str, list[float]] = {"forward": [], "full": []}
    for _ in range(repeat):
        for kind, gradients in (("forward", False), ("full", True)):
            plain = _seconds(baselines.plain, model, batches, gradients)
            check = _seconds(modelcheck.check, model, x, batch_size=batch_size, gradients=gradients)
            ratios[kind].append(check / plain)
    print(json.dumps(ratios))


def _seconds(run: Callable[..., object], *args: object, **kwargs: object) -> float:
    start = time.perf_counter()
    run(*args, **kwargs)
    return time.perf_counter() - start


def _run_tree(tree: str, args: argparse.Namespace) -> dict[str, list[float]]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [tree, os.environ.get("PYTHONPATH")])),
    }
    command = [sys.executable, __file__, "--worker", tree, "--model", args.model]
    command += ["--samples", str(args.samples), "--batch-size", str(args.batch_size)]
    command += ["--repeat", str(args.repeat)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "worker failed")
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="*", metavar="TREE", help="two modelcheck checkouts")
    parser.add_argument("--model", choices=sorted(BUILDERS), default="mlp")
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3, help="checks of each kind per process")
    parser.add_argument("--worker", metavar="TREE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.model, args.samples, args.batch_size, args.repeat)
    if len(args.trees) != 2:
        parser.error("give two trees: the one before a change and the one after")
    results: dict[str, dict[str, list[float]]] = {
        t: {"forward": [], "full": []} for t in args.trees
    }
    for round_ in range(args.rounds):
        order = args.trees if round_ % 2 == 0 else args.trees[::-1]
        for tree in order:
            for kind, ratios in _run_tree(tree, args).items():
                results[tree][kind].append(statistics.median(ratios))
    for tree, kinds in results.items():
        cells = [
            f"{kind} {statistics.median(r):.2f}x ({', '.join(f'{v:.2f}' for v in r)})"
            for kind, r in kinds.items()
        ]
        print(f"{tree}: " + "; ".join(cells))


if __name__ == "__main__":
    main()
