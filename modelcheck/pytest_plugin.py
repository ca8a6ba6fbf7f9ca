"""The pytest plugin: a ``modelcheck`` fixture, a marker, report and baseline options,
and a terminal summary. Registered through the ``pytest11`` entry point (``-p
no:modelcheck`` turns it off).

A thin layer over ``modelcheck.check()``: the fixture returns a
``modelcheck.assertions.Checker`` bound to the session's settings — built-in defaults,
then ``[tool.modelcheck]`` (found from the directory pytest was started in, upwards),
then ``--modelcheck-fail-on`` or its ini twin, then the test's
``@pytest.mark.modelcheck(...)``, then the call's own keywords — and to the test's
``__modelcheck__`` directory for baselines. Every pytest run in an environment with
modelcheck installed loads this module, so it imports torch and the engine only once a
test asks for the fixture.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from modelcheck.assertions import Checker
    from modelcheck.report import Report
    from modelcheck.settings import Settings

BASELINE_DIR = "__modelcheck__"
MARKER = "modelcheck"


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
            from modelcheck import config

            settings = config.load(start=self.config.invocation_params.dir).settings
            fail_on = _fail_on(self.config)
            if fail_on is not None:  # checked in pytest_configure
                settings = settings.updated({"fail_on": fail_on[0]}, fail_on[1])
            self._settings = settings
        return self._settings

    def checker(self, item: pytest.Item) -> Checker:
        from modelcheck.assertions import Checker

        def on_check(report: Report) -> Path | None:
            return self.record(item, report)

        def on_baseline(outcome: str) -> None:
            self.baselines[outcome] += 1

        return Checker(
            _marker_settings(item, self.settings()),
            baseline_dir=item.path.parent / BASELINE_DIR,
            update=self.update,
            update_hint="run pytest with --modelcheck-update",
            on_check=on_check,
            on_baseline=on_baseline,
        )

    def record(self, item: pytest.Item, report: Report) -> Path | None:
        """Count the check; write its HTML report when asked to, and return its path."""
        self.checks += 1
        self.failed += not report.ok
        self.tests.add(item.nodeid)
        self.severities.update(f.severity for f in report.findings)
        if self.report_dir is None:
            return None
        paths = item.stash.setdefault(_HTML, [])
        path = self.report_dir / _file_name(item.nodeid, len(paths))
        path.parent.mkdir(parents=True, exist_ok=True)
        report.write_html(path)
        paths.append(path)
        self.html.append(path)
        return path


_SESSION = pytest.StashKey[_Session]()
_HTML = pytest.StashKey[list]()


def _fail_on(pytest_config: pytest.Config) -> tuple[str, str] | None:
    """(value, where it came from) of the fail-on option, or its ini twin."""
    option = pytest_config.getoption("modelcheck_fail_on")
    if option:
        return option, "--modelcheck-fail-on"
    ini = pytest_config.getini("modelcheck_fail_on").strip()
    return (ini, "modelcheck_fail_on (ini)") if ini else None


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
    from modelcheck.errors import ConfigError

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
        help="write one HTML health report per check into DIR, named after the test",
    )
    group.addoption(
        "--modelcheck-fail-on",
        metavar="SEVERITY",
        help="lowest severity that fails a check: error, warning, info or never "
        "(default: [tool.modelcheck] fail-on, or error)",
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
    fail_on = _fail_on(config)
    if fail_on is not None:  # a bad value fails the run at once, in one line
        from modelcheck.settings import SEVERITY_CHOICES

        value, where = fail_on
        if value not in SEVERITY_CHOICES:
            raise pytest.UsageError(
                f"modelcheck: {where}: {value!r} is not one of {', '.join(SEVERITY_CHOICES)}"
            )
    config.stash[_SESSION] = _Session(config)


@pytest.fixture
def modelcheck(request: pytest.FixtureRequest) -> Checker:
    """``check`` and ``assert_healthy`` with the session's settings and this test's
    marker applied; reports keep baselines in ``__modelcheck__`` beside the test."""
    from modelcheck.errors import ModelcheckError

    try:
        return request.config.stash[_SESSION].checker(request.node)
    except ModelcheckError as error:
        pytest.fail(f"modelcheck: {error}", pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Link each test's HTML reports from pytest-html's report, when that plugin runs."""
    report = yield
    paths = item.stash.get(_HTML, [])
    if paths and call.when == "call" and item.config.pluginmanager.getplugin("html"):
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
    from modelcheck.renderers import counts_text

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
