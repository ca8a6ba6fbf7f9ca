"""Turn a Report into what a reader or a CI system wants: text, JSON, and more.

Renderers only read the report. Each takes a Report (and options) and returns a
string; writing it anywhere is the caller's business.
"""

from __future__ import annotations

import math

from modelcheck.report import Report
from modelcheck.rules import Finding

FORMATS = ("text", "json")


def render(report: Report, fmt: str, *, show_fixes: bool = False) -> str:
    if fmt == "json":
        return report.to_json() + "\n"
    return render_text(report, show_fixes=show_fixes)


def format_number(value: float | None) -> str:
    """Three significant digits, scientific outside [1e-3, 1e4)."""
    if value is None:
        return "n/a"
    if not math.isfinite(value):
        return str(value)
    if value == 0 or 1e-3 <= abs(value) < 1e4:
        return f"{value:.3g}"
    return f"{value:.2e}"


def finding_line(f: Finding, width: int = 0) -> str:
    """``layer  CODE slug  severity  value vs threshold — message``."""
    where = (f.layer or "<model>").ljust(width)
    measured = ""
    if f.value is not None and f.threshold is not None:
        measured = f"{format_number(f.value)} vs {format_number(f.threshold)} — "
    elif f.value is not None:
        measured = f"{format_number(f.value)} — "
    return f"{where}  {f.code} {f.rule}  {f.severity}  {measured}{f.message}"


def summary_line(report: Report) -> str:
    counts = report.summary
    parts = [
        _plural(counts["errors"], "error"),
        _plural(counts["warnings"], "warning"),
        _plural(counts["infos"], "info"),
    ]
    model, probe = report.model, report.probe
    scope = (
        f"{len(report.layers)} layers of {model.type} ({model.parameters:,} parameters) "
        f"on {probe.source} ({probe.samples} samples, loss {probe.loss})"
    )
    verdict = "passed" if report.ok else f"failed at --fail-on {report.fail_on}"
    if not report.findings:
        return f"All checks passed: {scope}."
    return f"Found {', '.join(parts)} in {scope}: {verdict}."


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def render_text(report: Report, *, show_fixes: bool = False) -> str:
    width = max((len(f.layer or "<model>") for f in report.findings), default=0)
    lines = []
    for f in report.findings:
        lines.append(finding_line(f, width))
        if show_fixes:
            lines += [f"{'':{width}}    fix: {fix}" for fix in f.fixes]
    lines += [f"note: {note}" for note in report.probe.notes]
    lines.append(summary_line(report))
    return "\n".join(lines) + "\n"
