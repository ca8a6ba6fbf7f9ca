"""Compare two source trees of modelcheck on one benchmark model: the A/B behind a change.

    git worktree add /tmp/before HEAD~1
    python benchmarks/compare.py /tmp/before . --model mlp --samples 4096

Each round runs one subprocess per tree, with that tree first on PYTHONPATH, alternating
which tree goes first. A subprocess times the model with ``run.py``'s ``time_case`` (plain
pass and check in turns) and reports the ratio of each check to the plain pass just before
it, so every ratio is taken within one process and a few seconds. This VM's speed drifts by
10-30% within minutes: a difference shows only when it holds across rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import allocator  # this script's directory is first on sys.path

HERE = Path(__file__).resolve().parent

BUILDERS = {"mlp": "mlp", "resnet": "resnet18", "transformer": "transformer"}


def worker(tree: str, model_name: str, samples: int, batch_size: int, repeat: int) -> None:
    """Time the model as ``run.py`` does; print each round's check / plain ratios as JSON."""
    sys.path.insert(0, str(HERE))
    import models
    import run

    import modelcheck

    if not Path(modelcheck.__file__).resolve().is_relative_to(Path(tree).resolve()):
        sys.exit(f"compare.py: modelcheck came from {modelcheck.__file__}, not from {tree}")
    build = getattr(models, BUILDERS[model_name])
    case = run.Case(model_name, lambda: build(samples=samples), batch_size, naive=False)
    rounds = run.time_case(case, repeat)["rounds"]
    pairs = {"forward": ("check_forward", "plain_forward"), "full": ("check", "plain")}
    ratios = {
        kind: [c / p for c, p in zip(rounds[check], rounds[plain])]
        for kind, (check, plain) in pairs.items()
    }
    print(json.dumps(ratios))


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
    allocator.fix_heap()
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
