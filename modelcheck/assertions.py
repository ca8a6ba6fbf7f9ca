"""Assertions for tests: ``assert_healthy``, and the ``Checker`` the pytest fixture returns.

Usable in any test runner (they raise AssertionError). A failure lists every finding as
the text renderer does, each with its first fix, so the message alone says what to do.
The Checker binds settings and a baseline directory, so its reports can
``assert_matches_baseline(name)``; the pytest plugin only supplies those and tallies.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from torch import nn

from modelcheck import baseline
from modelcheck.engine import check
from modelcheck.errors import ConfigError
from modelcheck.renderers import render_text
from modelcheck.report import Report
from modelcheck.settings import Settings
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


@dataclass(frozen=True, slots=True)
class BaselineReport(Report):
    """A Report that knows where its baselines live (a test's ``__modelcheck__``)."""

    baseline_dir: Path = Path("__modelcheck__")
    update: bool = False
    update_hint: str = "pass update=True"
    on_baseline: Callable[[str], None] | None = field(default=None, repr=False, compare=False)

    def assert_matches_baseline(
        self, name: str, *, tolerances: Mapping[str, Mapping[str, float]] | None = None
    ) -> None:
        """Compare this run's per-layer health metrics with ``NAME.json`` in the baseline
        directory: written (and failing) the first time, rewritten when updating,
        otherwise failing on any metric past its tolerance (``modelcheck.baseline``)."""
        __tracebackhide__ = True
        if not name or os.sep in name or "/" in name or name.startswith("."):
            raise ConfigError(f"baseline name {name!r} must be a plain file name, like 'iris'")
        path = self.baseline_dir / f"{name}.json"
        tell = self.on_baseline or (lambda outcome: None)
        existed = path.exists()
        try:
            outcome = baseline.assert_matches(
                self, path, tolerances=tolerances, update=self.update, update_hint=self.update_hint
            )
        except AssertionError:
            tell("changed" if existed else "created")
            raise
        tell(outcome)


class Checker:
    """``check`` and ``assert_healthy`` with fixed settings (call keywords still apply on
    top), returning reports that know their baseline directory. ``on_check`` sees each
    report and may return the path of a report file written for it, which a failure
    then names."""

    def __init__(
        self,
        settings: Settings,
        *,
        baseline_dir: Path,
        update: bool = False,
        update_hint: str = "pass update=True",
        on_check: Callable[[Report], Path | None] | None = None,
        on_baseline: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self._baseline = {
            "baseline_dir": baseline_dir,
            "update": update,
            "update_hint": update_hint,
            "on_baseline": on_baseline,
        }
        self._on_check = on_check

    def check(
        self,
        model: nn.Module | LoadedModel,
        probe: object = None,
        labels: object = None,
        **options: object,
    ) -> BaselineReport:
        return self._check(model, probe, labels, options)[0]

    def assert_healthy(
        self,
        model: nn.Module | LoadedModel,
        probe: object = None,
        labels: object = None,
        **options: object,
    ) -> BaselineReport:
        """``check``, raising AssertionError with every finding and its first fix when one
        reaches fail-on."""
        __tracebackhide__ = True
        report, written = self._check(model, probe, labels, options)
        if not report.ok:
            raise AssertionError(unhealthy_message(report, written))
        return report

    def _check(
        self, model: nn.Module | LoadedModel, probe: object, labels: object, options: dict
    ) -> tuple[BaselineReport, Path | None]:
        plain = check(model, probe, labels, settings=self.settings, **options)
        report = BaselineReport(
            **{f.name: getattr(plain, f.name) for f in fields(Report)}, **self._baseline
        )
        return report, self._on_check(report) if self._on_check else None
