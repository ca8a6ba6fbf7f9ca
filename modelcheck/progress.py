"""A progress bar on stderr for checks that run longer than a second.

Shown only where a person watches: when stderr is a terminal, outside pytest, and not
with ``--quiet`` (``progress = false``). tqdm's ``delay`` keeps quick checks silent, and
the bar clears itself when the check ends so the report reads as if it was never there.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")

DELAY_SECONDS = 1.0


def wanted(enabled: bool) -> bool:
    """Whether a bar should be drawn at all: enabled, on a terminal, not under pytest."""
    if not enabled or "PYTEST_CURRENT_TEST" in os.environ:
        return False
    stream = sys.stderr
    return stream is not None and hasattr(stream, "isatty") and stream.isatty()


@contextmanager
def bar(items: Iterable[T], enabled: bool, total: int | None) -> Iterator[Iterable[T]]:
    """``items`` again, advancing a bar of ``total`` steps as they are consumed."""
    if not wanted(enabled):
        yield items
        return
    from tqdm import tqdm  # imported only when a bar is drawn

    with tqdm(
        total=total,
        desc="modelcheck",
        unit="batch",
        file=sys.stderr,
        delay=DELAY_SECONDS,
        leave=False,
        dynamic_ncols=True,
    ) as progress:
        yield _advancing(items, progress)


def _advancing(items: Iterable[T], progress) -> Iterator[T]:
    for item in items:
        yield item
        progress.update(1)
