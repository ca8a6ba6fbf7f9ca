"""What the safety checks cost, each measured against the same work without it, in one run.

    python benchmarks/safety_costs.py

1. Loading a model file: torch.load(weights_only=True) alone, against modelcheck's
   load_model, which first checks every record of the archive against its CRC-32.
2. A check on a model whose first layer runs in place: modelcheck copies each probe
   batch so that the forward cannot write into the caller's tensors.
3. Rule files: check() on a small model with the parsed rules cached, against parsing
   all rule files on every call (as before the cache).

Medians of several repeats; the machine is shared, so read the ratios, not the seconds.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import modelcheck
from modelcheck import capture, rules
from modelcheck.source import load_model

REPEATS = 7


def median_seconds(work, repeats: int = REPEATS) -> float:
    work()  # warm up: imports, allocator, file cache
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def wide_stack() -> nn.Sequential:
    return nn.Sequential(*(nn.Linear(2048, 2048) for _ in range(16)))  # 256 MiB of float32


def loading(directory: Path) -> tuple[float, float]:
    (directory / "arch_for_benchmark.py").write_text(
        "from torch import nn\n\ndef make():\n"
        "    return nn.Sequential(*(nn.Linear(2048, 2048) for _ in range(16)))\n"
    )
    path = directory / "wide.pt"
    torch.save(wide_stack().state_dict(), path)
    sys.path.insert(0, str(directory))
    plain = median_seconds(lambda: torch.load(path, map_location="cpu", weights_only=True))
    checked = median_seconds(lambda: load_model(path, arch="arch_for_benchmark:make"))
    # load_model also builds the module and copies the weights in; time that on its own.
    state = torch.load(path, weights_only=True)
    build = median_seconds(lambda: wide_stack().load_state_dict(state))
    return plain + build, checked


def input_copy() -> tuple[float, float]:
    model = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    x = torch.randn(8192, 256)
    original = capture._prepare

    def aliasing(value, dtype, device):  # the old behaviour: the batch may alias x
        if isinstance(value, torch.Tensor):
            moved = value.to(device)
            return moved.to(dtype) if moved.is_floating_point() else moved
        return original(value, dtype, device)

    def run(prepare) -> float:
        capture._prepare = prepare
        try:
            start = time.perf_counter()
            modelcheck.check(model, x.clone(), batch_size=256)
            return time.perf_counter() - start
        finally:
            capture._prepare = original

    run(original), run(aliasing)  # warm up
    # Interleaved, so that load from other processes hits both sides alike.
    pairs = [(run(aliasing), run(original)) for _ in range(3 * REPEATS)]
    return statistics.median(a for a, _ in pairs), statistics.median(c for _, c in pairs)


def rule_cache() -> tuple[float, float]:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(64, 4)
    cached = median_seconds(lambda: modelcheck.check(model, x), repeats=21)

    def uncached():
        rules._load_rule_file.cache_clear()
        modelcheck.check(model, x)

    return median_seconds(uncached, repeats=21), cached


def main() -> None:
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, median of {REPEATS}+ runs")
    with tempfile.TemporaryDirectory() as directory:
        plain, checked = loading(Path(directory))
    print(
        f"load 256 MiB state_dict: torch.load + build {plain:.3f} s, "
        f"with CRC check {checked:.3f} s, ratio {checked / plain:.2f}"
    )
    shared, copying = input_copy()
    print(
        f"check 8192x256 MLP: probe aliased {shared:.3f} s, copied {copying:.3f} s, "
        f"ratio {copying / shared:.3f}"
    )
    uncached, cached = rule_cache()
    print(
        f"check small MLP: rules parsed every call {uncached * 1e3:.1f} ms, "
        f"cached {cached * 1e3:.1f} ms, ratio {cached / uncached:.2f}"
    )


if __name__ == "__main__":
    main()
