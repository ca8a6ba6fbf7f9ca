"""The pytest plugin, run inside pytest with ``pytester``: the fixture, readable failures,
the marker, options and ini, per-test HTML reports, health baselines and the summary."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from models import dead_relu_model, gaussian, mlp, seeded

import modelcheck
from modelcheck import baseline
from modelcheck.errors import ConfigError

pytest_plugins = ["pytester"]

# Small models the inner test sessions check: a healthy MLP, and the same with a share of
# its hidden ReLU units dead (bias -3: nine standard deviations below zero).
NETS = """
import torch
from torch import nn


def healthy():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def dead(share=0.75):
    model = healthy()
    with torch.no_grad():
        model[0].bias[: int(16 * share)] = -3.0
    return model


def x():
    return torch.randn(128, 8, generator=torch.Generator().manual_seed(0))
"""


@pytest.fixture
def inner(pytester, monkeypatch):
    """A pytest session to run; hypothesis's plugin is left out of it, since setting it up
    costs a second per session and these tests do not use it."""
    monkeypatch.setenv("PYTEST_ADDOPTS", "-p no:hypothesispytest")
    pytester.makepyfile(nets=NETS)
    pytester.syspathinsert()
    return pytester


def test_healthy_model_passes_and_faulty_one_fails_with_each_finding_and_its_fix(inner):
    inner.makepyfile(
        """
        from nets import healthy, dead, x

        def test_healthy(modelcheck):
            report = modelcheck.assert_healthy(healthy(), x())
            assert report.ok

        def test_dead(modelcheck):
            modelcheck.assert_healthy(dead(), x())
        """
    )
    result = inner.runpytest()
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "E*AssertionError: modelcheck: in-memory Sequential is unhealthy: "
            "1 finding at or above fail-on error",
            "E*1  MC101 dead-units  error  0.75 vs 0.5 — 12 of 16 units (75%) are active *",
            "E*     fix: Initialise the layer feeding 1 with He (Kaiming) init*",
            "E*Found 1 error, 0 warnings, 0 infos in * failed at --fail-on error.",
        ]
    )
    assert "Replace ReLU with LeakyReLU" not in result.stdout.str()  # the first fix only
    assert "pytest_plugin.py" not in result.stdout.str()  # our frames are hidden
    result.stdout.fnmatch_lines(
        ["*= modelcheck =*", "2 checks in 2 tests: 1 error, 0 warnings, 0 infos; 1 failed"]
    )


def test_marker_ignores_rules_sets_thresholds_and_the_closest_one_wins(inner):
    inner.makepyfile(
        """
        import pytest
        from nets import dead, x

        pytestmark = pytest.mark.modelcheck(fail_on="warning")

        @pytest.mark.modelcheck(ignore=["dead-units"])
        def test_ignored(modelcheck):
            modelcheck.assert_healthy(dead(), x())

        @pytest.mark.modelcheck(thresholds={"dead-units": {"warning": 0.9, "error": 0.95}})
        def test_raised_thresholds(modelcheck):
            modelcheck.assert_healthy(dead(), x())

        def test_module_marker_fails_on_warnings(modelcheck):
            modelcheck.assert_healthy(dead(0.4), x())
        """
    )
    result = inner.runpytest("--strict-markers")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*test_module_marker_fails_on_warnings*", "*fail-on warning*"])


def test_fail_on_comes_from_the_option_then_the_ini_then_pyproject(inner):
    inner.makepyfile(
        """
        from nets import dead, x

        def test_warning_only(modelcheck):
            modelcheck.assert_healthy(dead(0.4), x())
        """
    )
    inner.makefile(".toml", pyproject='[tool.modelcheck]\nfail-on = "warning"\n')
    inner.runpytest().assert_outcomes(failed=1)  # pyproject
    inner.makeini("[pytest]\nmodelcheck_fail_on = error\n")
    inner.runpytest().assert_outcomes(passed=1)  # ini beats pyproject
    inner.runpytest("--modelcheck-fail-on=warning").assert_outcomes(failed=1)  # option beats ini


def test_bad_fail_on_option_stops_the_run_with_one_line(inner):
    inner.makepyfile("def test_it():\n    pass\n")
    result = inner.runpytest("--modelcheck-fail-on=fatal")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["ERROR: modelcheck: --modelcheck-fail-on: 'fatal' is not one of error, warning, *"]
    )


def test_loading_the_plugin_does_not_import_torch():
    """Every pytest run in an environment with modelcheck loads the plugin."""
    code = "import sys, modelcheck.pytest_plugin; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr


def test_bad_configuration_fails_the_test_with_one_line(inner):
    inner.makefile(".toml", pyproject='[tool.modelcheck]\nfail-on = "fatal"\n')
    inner.makepyfile(
        """
        def test_it(modelcheck):
            pass
        """
    )
    result = inner.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*modelcheck: *pyproject.toml:2: fail-on: 'fatal' is not one of*"])
    assert "Traceback" not in result.stdout.str()


def test_summary_stays_silent_when_no_check_ran_and_plugin_can_be_disabled(inner):
    inner.makepyfile(
        """
        def test_plain():
            assert True
        """
    )
    result = inner.runpytest()
    result.assert_outcomes(passed=1)
    assert "= modelcheck =" not in result.stdout.str()
    inner.makepyfile(
        test_uses_fixture="""
        def test_needs_it(modelcheck):
            pass
        """
    )
    result = inner.runpytest("-p", "no:modelcheck", "test_uses_fixture.py")
    result.stdout.fnmatch_lines(["*fixture 'modelcheck' not found*"])


def test_report_directory_gets_one_html_per_checking_test_linked_from_pytest_html(inner):
    inner.makepyfile(
        """
        import pytest
        from nets import healthy, dead, x

        @pytest.mark.parametrize("share", [0.0, 0.75])
        def test_param(modelcheck, share):
            modelcheck.check(dead(share), x())

        def test_twice(modelcheck):
            modelcheck.check(healthy(), x())
            modelcheck.assert_healthy(dead(), x())

        def test_without_check():
            pass
        """
    )
    result = inner.runpytest("--modelcheck-report=health", "--html=out/tests.html")
    result.assert_outcomes(passed=3, failed=1)
    names = sorted(p.name for p in (inner.path / "health").iterdir())
    assert names == [
        "test_report_directory_gets_one_html_per_checking_test_linked_from_pytest_html.py_test_param_0.0.html",
        "test_report_directory_gets_one_html_per_checking_test_linked_from_pytest_html.py_test_param_0.75.html",
        "test_report_directory_gets_one_html_per_checking_test_linked_from_pytest_html.py_test_twice-2.html",
        "test_report_directory_gets_one_html_per_checking_test_linked_from_pytest_html.py_test_twice.html",
    ]
    for path in (inner.path / "health").iterdir():
        assert "<html" in path.read_text(encoding="utf-8").lower()
    result.stdout.fnmatch_lines(["*HTML report: *test_twice-2.html", "HTML reports: 4 in *health"])
    linked = (inner.path / "out" / "tests.html").read_text(encoding="utf-8")
    assert "../health/test_report_directory_gets_one_html_per_checking_test_linked_from" in linked


BASELINE_TEST = """
import os
from nets import dead, x

def test_net(modelcheck):
    report = modelcheck.check(dead(float(os.environ["DEAD_SHARE"])), x())
    report.assert_matches_baseline("net")
"""


def test_baseline_is_created_matched_fails_on_regression_and_is_updated(inner, monkeypatch):
    inner.makepyfile(test_health=BASELINE_TEST)
    stored = inner.path / "__modelcheck__" / "net.json"
    obtained = inner.path / "__modelcheck__" / "net.obtained.json"
    monkeypatch.setenv("DEAD_SHARE", "0.25")

    first = inner.runpytest()
    first.assert_outcomes(failed=1)
    first.stdout.fnmatch_lines(["*baseline *net.json did not exist; it was created now*"])
    assert json.loads(stored.read_text())["layers"]["1"]["dead_fraction"] == 0.25

    inner.runpytest().assert_outcomes(passed=1)

    monkeypatch.setenv("DEAD_SHARE", "0.5")  # plant a regression: four more dead units
    regressed = inner.runpytest()
    regressed.assert_outcomes(failed=1)
    regressed.stdout.fnmatch_lines(
        [
            "*modelcheck: * moved past the baseline *net.json:",
            "*1  dead_fraction       0.25 -> 0.5  (+0.25; tolerance ±0.02)",
            "*run pytest with --modelcheck-update to accept them.",
        ]
    )
    assert json.loads(obtained.read_text())["layers"]["1"]["dead_fraction"] == 0.5

    updated = inner.runpytest("--modelcheck-update")
    updated.assert_outcomes(passed=1)
    updated.stdout.fnmatch_lines(["baselines: 1 updated"])
    assert not obtained.exists()
    assert json.loads(stored.read_text())["layers"]["1"]["dead_fraction"] == 0.5
    inner.runpytest().assert_outcomes(passed=1)


# -- without pytester: the assertion and baseline helpers themselves --------------------------


def test_assert_healthy_works_without_the_fixture():
    healthy = seeded(0)(lambda: mlp([8, 16, 4]))()
    assert modelcheck.assert_healthy(healthy, gaussian()).ok
    with pytest.raises(AssertionError, match=r"(?s)unhealthy.*MC101 dead-units  error.*fix: "):
        modelcheck.assert_healthy(dead_relu_model(), gaussian())
    assert modelcheck.assert_healthy(dead_relu_model(), gaussian(), fail_on="never").findings


def test_baseline_tolerances_are_per_metric(tmp_path):
    path = tmp_path / "b.json"
    before = modelcheck.check(dead_relu_model(0.5), gaussian())
    after = modelcheck.check(dead_relu_model(0.6), gaussian())  # 3 more of 32 units dead
    with pytest.raises(AssertionError, match="created"):
        baseline.assert_matches(before, path)
    with pytest.raises(AssertionError, match=r"3 +dead_fraction +0\.5 -> 0\.594"):
        baseline.assert_matches(after, path)
    with pytest.raises(AssertionError) as failure:
        baseline.assert_matches(after, path, tolerances={"dead_fraction": {"atol": 0.1}})
    assert "dead_fraction" not in str(failure.value) and "zero_fraction" in str(failure.value)
    loose = {metric: {"atol": 1.0, "rtol": 1.0} for metric in baseline.METRICS}
    assert baseline.assert_matches(after, path, tolerances=loose) == "matched"


def test_baseline_names_layers_that_appeared_or_went(tmp_path):
    path = tmp_path / "b.json"
    short = modelcheck.check(seeded(0)(lambda: mlp([8, 16, 4]))(), gaussian())
    longer = modelcheck.check(seeded(0)(lambda: mlp([8, 16, 16, 4]))(), gaussian())
    baseline.assert_matches(short, path, update=True)
    with pytest.raises(AssertionError) as failure:
        baseline.assert_matches(longer, path)
    assert "new layer, not in the baseline" in str(failure.value)
    baseline.assert_matches(longer, path, update=True)
    with pytest.raises(AssertionError, match="layer gone"):
        baseline.assert_matches(short, path)


def test_baseline_tolerance_for_an_unknown_metric_is_an_error(tmp_path):
    report = modelcheck.check(dead_relu_model(), gaussian())
    with pytest.raises(ConfigError, match="'rsm' is not a baseline metric"):
        baseline.assert_matches(report, tmp_path / "b.json", tolerances={"rsm": {"rtol": 1}})


def test_tolerance_follows_the_isclose_rule():
    tolerance = baseline.Tolerance(atol=0.1, rtol=0.5)
    assert tolerance.allows(2.0, 3.1) and not tolerance.allows(2.0, 3.11)
    assert tolerance.allows(-2.0, -0.9) and not tolerance.allows(-2.0, -0.89)
    assert baseline.Tolerance().allows(3.0, 3.0) and not baseline.Tolerance().allows(3.0, 3.0001)
