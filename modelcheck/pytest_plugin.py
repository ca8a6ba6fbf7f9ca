"""The pytest plugin: a ``modelcheck`` fixture, a marker, report and baseline options,
and a terminal summary. Registered through the ``pytest11`` entry point (``-p
no:modelcheck`` turns it off).

A thin layer over ``modelcheck.check()``. The fixture returns a ``Checker`` bound to the
session's settings — built-in defaults, then ``[tool.modelcheck]`` (found from the
directory pytest was started in, upwards), then ``--modelcheck-fail-on`` or its ini
twin, then the test's ``@pytest.mark.modelcheck(...)``, then the call's own keywords.
Its reports know the test's ``__modelcheck__`` directory, where
``report.assert_matches_baseline(name)`` keeps health baselines.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path

import pytest
from torch import nn

from modelcheck import baseline, config
from modelcheck.assertions import unhealthy_message
from modelcheck.engine import check
from modelcheck.errors import ConfigError, ModelcheckError
from modelcheck.renderers import counts_text
from modelcheck.report import Report
from modelcheck.settings import SEVERITY_CHOICES, Settings
from modelcheck.source import LoadedModel

BASELINE_DIR = "__modelcheck__"
MARKER = "modelcheck"


@dataclass(frozen=True, slots=True)
class PytestReport(Report):
    """A Report that knows which test made it, for baselines kept beside the test."""

    baseline_dir: Path | None = None
    session: _Session | None = field(default=None, repr=False, compare=False)

    def assert_matches_baseline(self, name: str, *, tolerances: dict | None = None) -> None:
        """Compare this run's per-layer health metrics with ``__modelcheck__/NAME.json``
        beside the test: created (and failing) the first time, rewritten under
        ``--modelcheck-update``, otherwise failing on any metric past its tolerance."""
        __tracebackhide__ = True
        if not name or os.sep in name or "/" in name or name.startswith("."):
            raise ConfigError(f"baseline name {name!r} must be a plain file name, like 'iris'")
        path = self.baseline_dir / f"{name}.json"
        update = self.session.update if self.session else False
        existed = path.exists()
        try:
            outcome = baseline.assert_matches(
                self,
                path,
                tolerances=tolerances,
                update=update,
                update_hint="run pytest with --modelcheck-update",
            )
        except AssertionError:
            if self.session:
                self.session.baselines["changed" if existed else "created"] += 1
            raise
        if self.session:
            self.session.baselines[outcome] += 1


class Checker:
    """What the ``modelcheck`` fixture returns: ``check`` and ``assert_healthy`` with the
    session's settings and this test's marker applied, and a per-test HTML report."""

    def __init__(self, session: _Session, item: pytest.Item, settings: Settings) -> None:
        self._session, self._item, self.settings = session, item, settings

    def check(
        self,
        model: nn.Module | LoadedModel,
        probe: object = None,
        labels: object = None,
        **options: object,
    ) -> PytestReport:
        report = check(model, probe, labels, settings=self.settings, **options)
        plain = {f.name: getattr(report, f.name) for f in fields(Report)}
        report = PytestReport(
            **plain, baseline_dir=self._item.path.parent / BASELINE_DIR, session=self._session
        )
        self._session.record(self._item, report)
        return report

    def assert_healthy(
        self,
        model: nn.Module | LoadedModel,
        probe: object = None,
        labels: object = None,
        **options: object,
    ) -> PytestReport:
        """``check``, failing the test with every finding and its first fix when one
        reaches fail-on."""
        __tracebackhide__ = True
        report = self.check(model, probe, labels, **options)
        if not report.ok:
            html = self._item.stash.get(_HTML, [])
            raise AssertionError(unhealthy_message(report, html[-1] if html else None))
        return report


class _Session:
    """Settings shared by every test, and the tally the terminal summary prints."""

    def __init__(self, pytest_config: pytest.Config) -> None:
        self.config = pytest_config
        self.update = bool(pytest_config.getoption("modelcheck_update"))
        self.report_dir = _report_dir(pytest_config)
        self._settings: Settings | None = None
        self.checks = 0
        self.failed = 0
        self.tests: set[str] = set()
        self.severities: Counter[str] = Counter()
        self.html: list[Path] = []
        self.baselines: Counter[str] = Counter()

    def settings(self) -> Settings:
        """Defaults, then the configuration file, then the fail-on option (read once)."""
        if self._settings is None:
            start = self.config.invocation_params.dir
            settings = config.load(start=start).settings
            option = self.config.getoption("modelcheck_fail_on")
            ini = self.config.getini("modelcheck_fail_on")
            if option:
                settings = settings.updated({"fail_on": option}, "--modelcheck-fail-on")
            elif ini:
                settings = settings.updated({"fail_on": ini.strip()}, "ini modelcheck_fail_on")
            self._settings = settings
        return self._settings

    def record(self, item: pytest.Item, report: Report) -> None:
        self.checks += 1
        self.failed += not report.ok
        self.tests.add(item.nodeid)
        self.severities.update(f.severity for f in report.findings)
        if self.report_dir is not None:
            paths = item.stash.setdefault(_HTML, [])
            path = self.report_dir / _file_name(item.nodeid, len(paths))
            path.parent.mkdir(parents=True, exist_ok=True)
            report.write_html(path)
            paths.append(path)
            self.html.append(path)


_SESSION = pytest.StashKey[_Session]()
_HTML = pytest.StashKey[list]()


def _report_dir(pytest_config: pytest.Config) -> Path | None:
    option = pytest_config.getoption("modelcheck_report")
    if option:
        return Path(pytest_config.invocation_params.dir, option)
    ini = pytest_config.getini("modelcheck_report")
    if ini:
        root = pytest_config.inipath.parent if pytest_config.inipath else pytest_config.rootpath
        return Path(root, ini)
    return None


def _file_name(nodeid: str, index: int) -> str:
    """A file name per test from its node id, unique per check within the test."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", nodeid).strip("_.") or "test"
    if len(stem) > 150:  # keep under file-name limits, and unique
        stem = f"{stem[:130]}-{hashlib.sha256(nodeid.encode()).hexdigest()[:12]}"
    return f"{stem}{f'-{index + 1}' if index else ''}.html"


def _marker_settings(item: pytest.Item, settings: Settings) -> Settings:
    """Apply ``@pytest.mark.modelcheck(...)`` from the module level down to the test, so
    the closest marker wins; ``thresholds`` is the ``rules`` setting."""
    for marker in reversed(list(item.iter_markers(name=MARKER))):
        if marker.args:
            raise ConfigError("@pytest.mark.modelcheck takes keyword arguments only")
        values = {("rules" if k == "thresholds" else k): v for k, v in marker.kwargs.items()}
        settings = settings.updated(values, "@pytest.mark.modelcheck")
    return settings


# -- hooks ----------------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("modelcheck", "model health checks (modelcheck)")
    group.addoption(
        "--modelcheck-report",
        metavar="DIR",
        help="write one HTML health report per checking test into DIR",
    )
    group.addoption(
        "--modelcheck-fail-on",
        choices=SEVERITY_CHOICES,
        help="lowest severity that fails a check (default: [tool.modelcheck] fail-on, or error)",
    )
    group.addoption(
        "--modelcheck-update",
        action="store_true",
        help="rewrite health baselines (__modelcheck__/*.json) from this run",
    )
    parser.addini("modelcheck_report", "directory for per-test HTML health reports")
    parser.addini("modelcheck_fail_on", "lowest severity that fails a check")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "modelcheck(select=None, ignore=None, fail_on=None, thresholds=None, **settings): "
        "settings of the modelcheck fixture for this test, e.g. ignore=['saturation'] or "
        "thresholds={'dead-units': {'error': 0.6}}",
    )
    config.stash[_SESSION] = _Session(config)


@pytest.fixture
def modelcheck(request: pytest.FixtureRequest) -> Checker:
    """A checker with the session's settings and this test's marker applied."""
    session = request.config.stash[_SESSION]
    try:
        settings = _marker_settings(request.node, session.settings())
    except ModelcheckError as error:
        pytest.fail(f"modelcheck: {error}", pytrace=False)
    return Checker(session, request.node, settings)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Link each test's HTML reports from pytest-html's report, when that plugin runs."""
    report = yield
    paths = item.stash.get(_HTML, [])
    html_plugin = item.config.pluginmanager.getplugin("html")
    if paths and call.when == "call" and html_plugin is not None:
        from pytest_html import extras

        target = item.config.getoption("htmlpath", None)
        base = Path(target).resolve().parent if target else Path.cwd()
        links = [
            extras.url(Path(os.path.relpath(p.resolve(), base)).as_posix(), name=p.name)
            for p in paths
        ]
        report.extras = [*getattr(report, "extras", []), *links]
    return report


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    session = config.stash.get(_SESSION, None)
    if session is None or not session.checks:
        return
    write = terminalreporter.write_line
    terminalreporter.section("modelcheck")
    counts = {
        "errors": session.severities["error"],
        "warnings": session.severities["warning"],
        "infos": session.severities["info"],
    }
    checks = f"{session.checks} check{'s' if session.checks != 1 else ''}"
    tests = f"{len(session.tests)} test{'s' if len(session.tests) != 1 else ''}"
    failed = f"; {session.failed} failed" if session.failed else ""
    write(f"{checks} in {tests}: {counts_text(counts)}{failed}")
    if session.html:
        write(f"HTML reports: {len(session.html)} in {session.report_dir}")
    if session.baselines:
        parts = [f"{n} {what}" for what, n in sorted(session.baselines.items())]
        write(f"baselines: {', '.join(parts)}")
