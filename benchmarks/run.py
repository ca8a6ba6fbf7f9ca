"""Measure what a check costs against the floor, and write the results to README.md.

    python benchmarks/run.py            # everything, medians of 5 runs (about 25 minutes)
    python benchmarks/run.py --quick    # smaller sizes, one run, printed only: a smoke test

Every time is the median wall time of ``--repeat`` runs taken in this one process, and
every check's ratio divides it by the plain forward+backward (or forward) pass over the same
probe batches timed just before it, round by round, on a heap whose thresholds are fixed
(see allocator.py). Peak memory is measured in fresh subprocesses (the peak resident set
size of a process only grows), on the default heap.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import allocator  # noqa: E402
import baselines  # noqa: E402
import models  # noqa: E402

import modelcheck  # noqa: E402
from modelcheck import kernel  # noqa: E402

README = HERE / "README.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], tuple[torch.nn.Module, torch.Tensor]]
    batch_size: int
    naive: bool = True  # run the two naive baselines too


def cases(quick: bool) -> list[Case]:
    if quick:
        return [
            Case("Iris (seed network)", models.iris, 64),
            Case("MLP 20x1024", lambda: models.mlp(samples=512), 64),
            Case("ResNet-18 shape", lambda: models.resnet18(samples=16, size=32), 16),
            Case("TransformerEncoder", lambda: models.transformer(samples=4), 4),
        ]
    return [
        Case("Iris (seed network), 150 samples", models.iris, 64),
        Case("MLP 20x1024, 8,192 samples", models.mlp, 64),
        Case("MLP 20x1024, 8,192 samples, batches of 512", models.mlp, 512, naive=False),
        Case("ResNet-18 shape, 256x3x64x64", models.resnet18, 64),
        Case("TransformerEncoder 6x512, 64x128", models.transformer, 64),
    ]


def median_time(run: Callable[[], object], repeat: int) -> float:
    return medians({"t": run}, repeat)["t"]


def medians(runs: dict[str, Callable[[], object]], repeat: int) -> dict:
    """Median wall time of each run, taken in turns (plain, check, plain, check, ...) so a
    change in the machine's load between rounds falls on every run alike; and under
    "rounds", every round's times, for ratios taken within a round (see ``_paired``)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    row: dict = {name: statistics.median(values) for name, values in times.items()}
    row["rounds"] = times
    return row


def time_case(case: Case, repeat: int) -> dict:
    model, x = case.build()
    batches = list(x.split(case.batch_size))
    check = lambda **kw: modelcheck.check(model, x, batch_size=case.batch_size, **kw)  # noqa: E731
    # Warm up allocator, kernels and rule loading on one batch.
    baselines.plain(model, batches[:1])
    modelcheck.check(model, batches[0], batch_size=case.batch_size)
    row = medians(
        {
            "plain": lambda: baselines.plain(model, batches),
            "check": check,
            "plain_forward": lambda: baselines.plain(model, batches, False),
            "check_forward": lambda: check(gradients=False),
            # The hooks with no statistics, each after a plain pass of its own.
            "plain_again": lambda: baselines.plain(model, batches),
            "capture": lambda: baselines.capture_only(model, batches),
            "plain_forward_again": lambda: baselines.plain(model, batches, False),
            "capture_forward": lambda: baselines.capture_only(model, batches, False),
        },
        repeat,
    )
    if case.naive:
        row["seed_prefix"] = median_time(lambda: baselines.seed_prefix(model, batches), 1)
        row["collect_all"] = median_time(lambda: baselines.collect_all(model, batches), 1)
    return row


def depth_scaling(depths: list[int], samples: int, repeat: int) -> list[dict]:
    return [_depth_row(depth, samples, repeat) for depth in depths]


def _depth_row(depth: int, samples: int, repeat: int) -> dict:
    model, x = models.mlp(depth=depth, samples=samples)
    batches = list(x.split(64))
    row = medians(
        {
            "plain_forward": lambda: baselines.plain(model, batches, False),
            "check_forward": lambda: modelcheck.check(model, x, batch_size=64, gradients=False),
        },
        repeat,
    )
    row["depth"] = depth
    row["seed_prefix"] = median_time(lambda: baselines.seed_prefix(model, batches), 1)
    return row


# -- memory, each measurement in a fresh process -----------------------------------------------


def memory_worker(mode: str, samples: int, width: int) -> None:
    """Run one plain pass or one check over a streamed random probe; print the peak RSS."""
    from modelcheck.probe import probe_from_spec

    model, _ = models.mlp(depth=20, width=width, samples=1)
    probe = probe_from_spec("random", input_shape=(width,), random_samples=samples)
    if mode == "plain":
        baselines.plain(model, [b.inputs for b in probe.batches])
    else:
        modelcheck.check(model, probe)
    print(_status_mib("VmHWM:"))


def _status_mib(field: str) -> float:
    """A memory figure of this process from /proc/self/status, in MiB.

    VmHWM is the peak resident set of this process image (getrusage's ru_maxrss would carry
    the parent's peak over into a child on Linux).
    """
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return float("nan")


def _anon_rss_mib() -> float:
    return _status_mib("RssAnon:")


def mmap_worker(path: str) -> None:
    """Check a model on a .npy probe file; print the peak private (anonymous) memory.

    Pages of a memory-mapped file that were read stay resident while memory is plentiful
    but belong to the page cache, not to the process: anonymous memory is what it owns.
    """
    width = int(np.load(path, mmap_mode="r").shape[1])
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, 10)
    )
    peak = [_anon_rss_mib()]
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.005):
            peak[0] = max(peak[0], _anon_rss_mib())

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        modelcheck.check(model, path, batch_size=1024, gradients=False)
    finally:
        done.set()
        watcher.join()
    print(max(peak[0], _anon_rss_mib()))


def _subprocess(*args: str) -> float:
    out = subprocess.run(
        [sys.executable, __file__, *args],
        check=True,
        capture_output=True,
        text=True,
        env=allocator.default_heap(),
    )
    return float(out.stdout.split()[-1])


def memory_scaling(sizes: list[int], width: int) -> list[dict[str, float]]:
    rows = []
    for samples in sizes:
        plain = _subprocess("--memory-worker", "plain", str(samples), str(width))
        check = _subprocess("--memory-worker", "check", str(samples), str(width))
        rows.append({"samples": samples, "plain": plain, "check": check})
    return rows


def mmap_probe(rows_list: list[int], width: int) -> list[dict[str, float]]:
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for rows in rows_list:
            path = os.path.join(folder, f"probe_{rows}.npy")
            data = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, width))
            gen = np.random.default_rng(0)
            for start in range(0, rows, 65536):
                chunk = data[start : start + 65536]
                chunk[:] = gen.standard_normal(chunk.shape, dtype=np.float32)
            data.flush()
            del data
            peak = _subprocess("--mmap-worker", path)
            results.append({"rows": rows, "file_mib": os.path.getsize(path) / 2**20, "anon": peak})
            os.remove(path)
    return results


# Each with the exit code it must end with.
STARTUP_COMMANDS = (
    (["--version"], 0),
    (["rules"], 0),
    (["rule", "MC101"], 0),
    (["--show-settings"], 0),
    (["missing.pt"], 2),  # a check refused for its model path
)


def startup(repeat: int) -> dict[str, float]:
    """Wall time of fresh processes: the commands that run no model, and the imports a
    check cannot avoid (Python alone, Python importing torch)."""
    commands = {
        "python -c pass": ([sys.executable, "-c", "pass"], 0),
        "python -c 'import torch'": ([sys.executable, "-c", "import torch"], 0),
    }
    for argv, code in STARTUP_COMMANDS:
        name = "modelcheck " + " ".join(argv)
        commands[name] = ([sys.executable, "-m", "modelcheck.cli", *argv], code)
    runs = {name: functools.partial(_run_expecting, *command) for name, command in commands.items()}
    times = medians(runs, repeat)
    del times["rounds"]
    return times


def _run_expecting(command: list[str], code: int) -> None:
    done = subprocess.run(command, capture_output=True)
    if done.returncode != code:
        sys.exit(f"{' '.join(command)} exited {done.returncode}, not {code}: {done.stderr!r}")


# -- the write-up ------------------------------------------------------------------------------


def machine() -> list[str]:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if "model name" in line)
    except (OSError, StopIteration):
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return [
        f"- date: {datetime.date.today().isoformat()}",
        f"- CPU: {cpu}, {os.cpu_count()} cores, {memory:.0f} GiB RAM; no GPU",
        f"- Python {platform.python_version()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), numpy {np.__version__}, "
        f"{platform.system()} {platform.release()}",
        "- load average at start / end: {start} / {end} (the machine is shared)",
        f"- timed on {allocator.description()}; peak memory on the default heap",
        f"- statistics of float32 CPU activations: {_reductions()}",
    ]


def _reductions() -> str:
    if kernel.LIBRARY is None:
        return "PyTorch's operations"
    threads = "PyTorch's threads" if kernel.THREADED else "one thread"
    return f"one pass of the compiled kernel, large activations on {threads}"


def _s(seconds: float) -> str:
    return f"{seconds:.3f} s" if seconds < 10 else f"{seconds:.1f} s"


def _x(ratio: float) -> str:
    return f"{ratio:.2f}x"


def _paired(row: dict, check: str, plain: str) -> str:
    """The median (lowest-highest) of check / plain within each round: runs seconds apart
    share the machine's speed of the moment, which drifts by 10-30% over minutes here."""
    rounds = row["rounds"]
    ratios = [c / p for c, p in zip(rounds[check], rounds[plain])]
    spread = f" ({min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else ""
    return f"**{_x(statistics.median(ratios))}**{spread}"


def report(results: dict, repeat: int) -> str:
    lines = [line.format(**results["load"]) for line in machine()]
    lines += [
        f"- each time is the median of {repeat} runs in one process (naive baselines: 1 run);"
        " a check's ratio is the median (lowest-highest) of its ratios to the plain pass"
        " run just before it, round by round",
        "",
        "### Time against the floor",
        "",
        "| model | plain fwd+bwd | check | ratio | plain fwd | check --no-gradients | ratio "
        "| seed's prefix method | collect all + numpy/scipy | check is faster than that by |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in results["cases"].items():
        naive = "| – | – | – |"
        if "seed_prefix" in row:
            naive = (
                f"| {_s(row['seed_prefix'])} ({_x(row['seed_prefix'] / row['plain_forward'])}"
                f" fwd) | {_s(row['collect_all'])} | {_x(row['collect_all'] / row['check'])} |"
            )
        lines.append(
            f"| {name} | {_s(row['plain'])} | {_s(row['check'])} | "
            f"{_paired(row, 'check', 'plain')} | {_s(row['plain_forward'])} | "
            f"{_s(row['check_forward'])} | {_paired(row, 'check_forward', 'plain_forward')} "
            + naive
        )
    lines += [
        "",
        "### What the hooks cost alone",
        "",
        "A check's own passes over the probe (`capture.run`: hooks, function mode, held "
        "outputs, the same loss and backward) with an observer that keeps nothing, against "
        "the plain pass run just before it: the part of a check's cost that no faster "
        "statistic can remove.",
        "",
        "| model | capture alone, fwd+bwd | check | capture alone, fwd | check --no-gradients |",
        "|---|---|---|---|---|",
    ]
    for name, row in results["cases"].items():
        lines.append(
            f"| {name} | {_paired(row, 'capture', 'plain_again')} | "
            f"{_paired(row, 'check', 'plain')} | "
            f"{_paired(row, 'capture_forward', 'plain_forward_again')} | "
            f"{_paired(row, 'check_forward', 'plain_forward')} |"
        )
    lines += [
        "",
        "### Growth with depth (MLP of width 1024, forward only, "
        f"{results['depth_samples']} samples)",
        "",
        "| depth | plain fwd | check --no-gradients | ratio | seed's prefix method | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for row in results["depth"]:
        lines.append(
            f"| {row['depth']} | {_s(row['plain_forward'])} | {_s(row['check_forward'])} | "
            f"{_paired(row, 'check_forward', 'plain_forward')} | {_s(row['seed_prefix'])} | "
            f"{_x(row['seed_prefix'] / row['plain_forward'])} |"
        )
    memory = results["memory"]
    first = memory[0]["check"]
    lines += [
        "",
        f"### Peak memory (MLP 20x{results['memory_width']}, streamed random probe, "
        "fresh process each)",
        "",
        "| probe samples | plain fwd+bwd peak RSS | check peak RSS | check - plain | "
        "check growth from the smallest probe |",
        "|---|---|---|---|---|",
    ]
    for row in memory:
        lines.append(
            f"| {row['samples']:,} | {row['plain']:.0f} MiB | {row['check']:.0f} MiB | "
            f"{row['check'] - row['plain']:+.0f} MiB | {100 * (row['check'] / first - 1):+.1f}% |"
        )
    lines += [
        "",
        "### A memory-mapped `.npy` probe (forward-only check, batches of 1,024 rows)",
        "",
        "| file | peak private (anonymous) memory of the process |",
        "|---|---|",
    ]
    for row in results["mmap"]:
        lines.append(f"| {row['rows']:,} rows, {row['file_mib']:.0f} MiB | {row['anon']:.0f} MiB |")
    lines += [
        "",
        "### Start-up of the commands that run no model (fresh process each)",
        "",
        "| command | wall time |",
        "|---|---|",
    ]
    for command, seconds in results["startup"].items():
        lines.append(f"| `{command}` | {seconds:.2f} s |")
    return "\n".join(lines) + "\n"


def write_readme(text: str) -> None:
    current = README.read_text() if README.exists() else f"{BEGIN}\n{END}\n"
    head, rest = current.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    README.write_text(f"{head}{BEGIN}\n{text}{END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="small sizes, printed only: a smoke run"
    )
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="print, leave README.md alone")
    parser.add_argument("--memory-worker", nargs=3, metavar=("MODE", "SAMPLES", "WIDTH"))
    parser.add_argument("--mmap-worker", metavar="PATH")
    args = parser.parse_args()
    if args.memory_worker:
        mode, samples, width = args.memory_worker
        return memory_worker(mode, int(samples), int(width))
    if args.mmap_worker:
        return mmap_worker(args.mmap_worker)
    allocator.fix_heap()
    repeat = 1 if args.quick else args.repeat
    results: dict = {"load": {"start": f"{os.getloadavg()[0]:.1f}"}}
    results["cases"] = {}
    for case in cases(args.quick):
        print(f"timing {case.name} ...", file=sys.stderr, flush=True)
        results["cases"][case.name] = time_case(case, repeat)
    print("depth scaling ...", file=sys.stderr, flush=True)
    results["depth_samples"] = 256 if args.quick else 1024
    depths = [5, 10] if args.quick else [5, 10, 20, 40]
    results["depth"] = depth_scaling(depths, results["depth_samples"], repeat)
    print("memory ...", file=sys.stderr, flush=True)
    results["memory_width"] = 128
    sizes = [1_000, 10_000] if args.quick else [1_000, 10_000, 100_000]
    results["memory"] = memory_scaling(sizes, results["memory_width"])
    rows = [20_000] if args.quick else [200_000, 2_000_000]
    results["mmap"] = mmap_probe(rows, 256)
    print("start-up ...", file=sys.stderr, flush=True)
    results["startup"] = startup(repeat)
    results["load"]["end"] = f"{os.getloadavg()[0]:.1f}"
    text = report(results, repeat)
    print(text)
    if not (args.no_write or args.quick):  # a smoke run's numbers are not results
        write_readme(text)


if __name__ == "__main__":
    main()
