"""``assert_healthy``: a check that fails a test with the findings written out.

Usable in any test runner (it raises AssertionError); the pytest fixture wraps it with the
session's settings, the marker and the per-test report. The message lists every finding
as the text renderer does, each with its first fix, so the failure alone says what to do.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from modelcheck.engine import check
from modelcheck.renderers import render_text
from modelcheck.report import Report
from modelcheck.source import LoadedModel


def assert_healthy(
    model: nn.Module | LoadedModel, probe: object = None, labels: object = None, **options: object
) -> Report:
    """``modelcheck.check(model, probe, labels, **options)``, raising AssertionError when a
    finding reaches ``fail_on``; returns the report otherwise."""
    __tracebackhide__ = True
    report = check(model, probe, labels, **options)
    if not report.ok:
        raise AssertionError(unhealthy_message(report))
    return report


def unhealthy_message(report: Report, html: Path | None = None) -> str:
    failing = len(report.failing)
    lines = [
        f"modelcheck: {report.model.description} is unhealthy: {failing} "
        f"finding{'s' if failing != 1 else ''} at or above fail-on {report.fail_on}",
        render_text(report, show_fixes=True, max_fixes=1).rstrip("\n"),
    ]
    if html is not None:
        lines.append(f"HTML report: {html}")
    return "\n".join(lines)
