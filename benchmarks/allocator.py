"""Timings taken on a heap that keeps its freed memory, so that the floor they are divided by
does not depend on the process's history.

glibc's malloc serves large blocks (a 1024x1024 weight's gradient is 4 MiB) from fresh
zeroed pages or from its heap, by a threshold it moves as blocks are freed, and returns
freed memory at the heap's top to the kernel. Which way a pass goes depends on what the
process did before: on this benchmark's 20x1024 MLP (2,048 samples, fwd+bwd) the plain pass
took 1.22 s with ~70k page faults in one process and 1.69 s with ~520k in another, running
the same code, so a check's ratio to it came out anywhere from 1.06x to 1.42x. With both
thresholds fixed, the plain pass takes no page faults and a ratio repeats within ~2%.
"""

from __future__ import annotations

import os
import platform
import sys

FIXED = {
    "MALLOC_MMAP_THRESHOLD_": str(32 << 20),  # glibc's largest allowed value
    "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
}


def fix_heap() -> None:
    """Run this script again with glibc's thresholds fixed (they are read at start-up),
    unless they are already, or the platform's allocator is not glibc's."""
    if not _glibc() or all(os.environ.get(k) == v for k, v in FIXED.items()):
        return
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **FIXED})


def default_heap() -> dict[str, str]:
    """The environment without the fixed thresholds: for measuring peak memory, which a heap
    that keeps its freed memory would overstate."""
    return {k: v for k, v in os.environ.items() if k not in FIXED}


def description() -> str:
    if not _glibc():
        return "the platform's default allocator"
    mmap, trim = (int(os.environ.get(k, 0)) >> 20 for k in FIXED)
    return (
        f"glibc malloc with its mmap threshold fixed at {mmap} MiB and its trim threshold "
        f"at {trim} MiB (see allocator.py)"
    )


def _glibc() -> bool:
    return platform.libc_ver()[0] == "glibc"
