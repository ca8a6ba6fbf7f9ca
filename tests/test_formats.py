"""CI output formats: golden files for each format, SARIF valid against the official 2.1.0
schema, JUnit counts that add up, GitHub annotations escaped, statistics per rule, and
every renderer surviving an empty report, a report of nulls and the Iris example."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import jsonschema
import pytest
from models import constant_output_model, dead_relu_model, mlp, seeded, trained_seed_network

import modelcheck
from modelcheck.cli import main
from modelcheck.renderers import FORMATS, render, render_statistics
from modelcheck.report import ModelInfo, ProbeInfo, Report
from modelcheck.rules import Finding
from modelcheck.stats import LayerStats

GOLDEN = Path(__file__).parent / "test_formats"
SCHEMA = json.loads((Path(__file__).parent / "schemas" / "sarif-schema-2.1.0.json").read_text())


def pinned(report: Report, source: str = "models/dead.pt") -> Report:
    """The report with everything that changes between runs and machines fixed."""
    model = dataclasses.replace(report.model, source=source, description=f"state_dict {source}")
    return dataclasses.replace(
        report,
        version="0.1.0",
        torch_version="2.x",
        created="2026-01-01T00:00:00+00:00",
        model=model,
    )


@functools.cache
def dead_report() -> Report:
    return pinned(modelcheck.check(dead_relu_model(), None))


@functools.cache
def healthy_report() -> Report:
    return pinned(modelcheck.check(seeded(0)(lambda: mlp([8, 16, 4]))(), None), "healthy.pt")


def empty_report() -> Report:
    return Report(
        version="0.1.0",
        torch_version="2.x",
        created="2026-01-01T00:00:00+00:00",
        model=ModelInfo("<in-memory module>", "module", "Empty", 0, 0, "float32", "cpu", "empty"),
        probe=ProbeInfo("nothing", 0, 0, False, "surrogate", False, True, 16),
        layers=(),
        input=None,
        output=None,
        findings=(),
        rules=(),
        fail_on="error",
    )


def nulls_report() -> Report:
    """Every optional value missing or not finite, names XML and JSON must escape, and a
    finding whose rule the report does not list."""
    odd = 'odd<&>"\x01:name,%'
    layer = LayerStats(odd, "Mystery", "other", False, 0, None, None, None, (), 0)
    finding = Finding(
        code="MC999",
        rule="made-up",
        severity="info",
        layer=odd,
        value=math.nan,
        threshold=None,
        message="100% odd: a\nsecond line",
        fixes=(),
        title="A rule from elsewhere",
    )
    model_wide = dataclasses.replace(finding, layer=None, value=None, severity="warning")
    return dataclasses.replace(
        empty_report(), layers=(layer,), findings=(finding, model_wide), checked=(("MC999", odd),)
    )


# -- golden files ---------------------------------------------------------------------------


def assert_golden(request, name: str, text: str, *, structured: bool = False) -> None:
    """Compare with tests/test_formats/NAME; ``--update-goldens`` rewrites it instead.
    Structured (JSON) goldens compare numbers to 1e-6 relative, since the last digits of
    float statistics may differ between machines; text goldens compare exactly."""
    path = GOLDEN / name
    if request.config.getoption("--update-goldens"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return
    assert path.exists(), f"{path} is missing; run pytest --update-goldens to write it"
    expected = path.read_text(encoding="utf-8")
    if structured:
        assert_close(json.loads(text), json.loads(expected))
    else:
        assert text == expected


def assert_close(obtained, expected, where="$"):
    if isinstance(expected, float) or isinstance(obtained, float):
        assert isinstance(obtained, (int, float)), f"{where}: {obtained!r} != {expected!r}"
        assert math.isclose(obtained, expected, rel_tol=1e-6, abs_tol=1e-9), (
            f"{where}: {obtained!r} != {expected!r}"
        )
    elif isinstance(expected, dict):
        assert isinstance(obtained, dict) and obtained.keys() == expected.keys(), where
        for key in expected:
            assert_close(obtained[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(obtained, list) and len(obtained) == len(expected), where
        for i, (a, b) in enumerate(zip(obtained, expected)):
            assert_close(a, b, f"{where}[{i}]")
    else:
        assert obtained == expected, f"{where}: {obtained!r} != {expected!r}"


GOLDEN_FILES = {
    "text": "dead.txt",
    "concise": "dead.concise.txt",
    "json": "dead.json",
    "sarif": "dead.sarif",
    "junit": "dead.junit.xml",
    "github": "dead.github.txt",
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_matches_its_golden_file(request, fmt):
    assert_golden(
        request, GOLDEN_FILES[fmt], render(dead_report(), fmt), structured=fmt in ("json", "sarif")
    )


def test_statistics_match_their_golden_files(request):
    assert_golden(request, "dead.statistics.txt", render_statistics(dead_report(), "text"))
    assert_golden(
        request,
        "dead.statistics.json",
        render_statistics(dead_report(), "json"),
        structured=True,
    )


# -- SARIF ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [dead_report, healthy_report, empty_report, nulls_report],
    ids=["dead", "healthy", "empty", "nulls"],
)
def test_sarif_validates_against_the_official_2_1_0_schema(make):
    log = json.loads(render(make(), "sarif"))
    jsonschema.Draft7Validator(SCHEMA).validate(log)
    assert log["version"] == "2.1.0"


def test_sarif_results_point_at_the_model_file_and_the_layer():
    report = dead_report()
    run = json.loads(render(report, "sarif"))["runs"][0]
    dead = next(r for r in run["results"] if r["ruleId"] == "MC101")
    finding = next(f for f in report.findings if f.code == "MC101")
    assert dead["level"] == "error"
    location = dead["locations"][0]
    assert location["physicalLocation"]["artifactLocation"]["uri"] == "models/dead.pt"
    assert location["logicalLocations"][0]["name"] == finding.layer == "3"
    assert finding.message in dead["message"]["text"]
    assert run["tool"]["driver"]["rules"][dead["ruleIndex"]]["id"] == "MC101"


def test_sarif_levels_follow_severities():
    levels = {r["ruleId"]: r["level"] for r in _results(dead_report())}
    severities = {f.code: f.severity for f in dead_report().findings}
    mapping = {"error": "error", "warning": "warning", "info": "note"}
    assert levels == {code: mapping[s] for code, s in severities.items()}


def test_sarif_fingerprint_is_stable_per_rule_and_layer_whatever_the_value():
    less_dead = pinned(modelcheck.check(dead_relu_model(0.6), None))
    first = {r["ruleId"]: r for r in _results(dead_report())}["MC101"]
    second = {r["ruleId"]: r for r in _results(less_dead)}["MC101"]
    assert first["properties"]["value"] != second["properties"]["value"]
    assert first["partialFingerprints"] == second["partialFingerprints"]
    prints = [r["partialFingerprints"]["modelcheckRuleLayer/v1"] for r in _results(dead_report())]
    assert len(set(prints)) == len(prints)


def test_sarif_rules_carry_descriptions_help_and_fixes():
    rules = json.loads(render(dead_report(), "sarif"))["runs"][0]["tool"]["driver"]["rules"]
    assert [r["id"] for r in rules] == [r.code for r in dead_report().rules]
    dead = next(r for r in rules if r["id"] == "MC101")
    assert dead["name"] == "dead-units"
    assert dead["shortDescription"]["text"] == "ReLU units that never fire"
    assert "ReLU-family layers" in dead["fullDescription"]["text"]
    assert "How to fix" in dead["help"]["text"]
    assert "Initialise the layer feeding <layer> with He" in dead["help"]["text"]


def test_sarif_of_an_in_memory_module_has_only_the_logical_location():
    report = modelcheck.check(dead_relu_model(), None)
    for result in _results(report):
        assert result["locations"][0].keys() == {"logicalLocations"}


def _results(report: Report) -> list[dict]:
    return json.loads(render(report, "sarif"))["runs"][0]["results"]


# -- JUnit ----------------------------------------------------------------------------------


def junit(report: Report) -> ET.Element:
    return ET.fromstring(render(report, "junit"))


@pytest.mark.parametrize(
    "make", [dead_report, healthy_report, nulls_report], ids=["dead", "healthy", "nulls"]
)
def test_junit_counts_one_case_per_rule_and_layer_checked_and_one_failure_per_finding(make):
    report = make()
    root = junit(report)
    suite = root.find("testsuite")
    cases = suite.findall("testcase")
    failures = suite.findall("testcase/failure")
    assert int(root.get("tests")) == int(suite.get("tests")) == len(cases)
    assert int(root.get("failures")) == int(suite.get("failures")) == len(failures)
    assert len(failures) == len(report.findings)
    assert len(cases) >= len(set(report.checked))
    names = {(c.get("classname").split(".")[1], c.get("name")) for c in cases}
    # XML 1.0 cannot hold control characters: they show as U+FFFD
    checked = {
        (code, (layer or "<model>").replace("\x01", "\ufffd")) for code, layer in report.checked
    }
    assert checked <= names


def test_junit_failure_sits_on_the_finding_rule_and_layer():
    report = dead_report()
    failed = {
        (case.get("classname"), case.get("name")): case.find("failure")
        for case in junit(report).iter("testcase")
        if case.find("failure") is not None
    }
    for f in report.findings:
        failure = failed[(f"modelcheck.{f.code}.{f.rule}", f.layer or "<model>")]
        assert failure.get("type") == f.severity
        assert f.message in failure.get("message")
        assert f.fixes[0] in failure.text


def test_junit_model_wide_finding_fails_the_model_case():
    report = modelcheck.check(constant_output_model(), None)
    collapsed = [f for f in report.findings if f.rule == "collapsed-output"]
    assert collapsed, [f.rule for f in report.findings]
    cases = [c for c in junit(report).iter("testcase") if "collapsed-output" in c.get("classname")]
    assert [c.get("name") for c in cases] == ["<model>"]
    assert cases[0].find("failure") is not None


# -- GitHub annotations and statistics ------------------------------------------------------


def test_github_annotations_escape_what_would_end_a_workflow_command():
    lines = render(nulls_report(), "github").splitlines()
    assert len(lines) == 2
    # Control characters are shown escaped, as in the text format: a raw ESC would drive
    # the log viewer's terminal emulation.
    assert lines[0].startswith('::notice title=MC999 made-up (odd<&>"\\x01%3Aname%2C%25)::')
    assert "100%25 odd: a%0Asecond line" in lines[0]
    assert lines[1].startswith("::warning title=MC999 made-up (model)::<model>: ")


def test_github_annotations_name_the_model_file_and_the_first_fix():
    lines = render(dead_report(), "github").splitlines()
    dead = next(line for line in lines if "MC101" in line)
    assert dead.startswith("::error file=models/dead.pt,title=MC101 dead-units (3)::3: 0.75 vs 0.5")
    assert "%0Afix: Initialise the layer feeding 3" in dead


def test_statistics_count_findings_per_rule_most_frequent_first():
    report = dead_report()
    extra = dataclasses.replace(report.findings[0], layer="other", severity="warning")
    doubled = dataclasses.replace(report, findings=(*report.findings, extra))
    rows = json.loads(render_statistics(doubled, "json"))
    assert rows[0] == {
        "code": report.findings[0].code,
        "rule": report.findings[0].rule,
        "count": 2,
        "severity": report.findings[0].severity,
    }
    assert sum(r["count"] for r in rows) == len(doubled.findings)
    first = render_statistics(doubled, "text").splitlines()[0].split()
    assert first[:2] == ["2", report.findings[0].code]


# -- contract: every renderer, every kind of report ----------------------------------------


@functools.cache
def iris_report() -> Report:
    model, x, y = trained_seed_network()
    return modelcheck.check(model, x, y)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "make", [empty_report, nulls_report, iris_report], ids=["empty", "nulls", "iris"]
)
def test_every_renderer_handles_empty_null_and_real_reports(make, fmt):
    report = make()
    text = render(report, fmt)
    assert text.endswith("\n") or (text == "" and not report.findings)
    if fmt in ("json", "sarif"):
        json.loads(text)
    if fmt == "junit":
        ET.fromstring(text)
    if fmt == "github":
        assert len(text.splitlines()) == len(report.findings)
    for f in report.findings:
        assert f.code in text


# -- command line ---------------------------------------------------------------------------


@pytest.fixture
def dead_file(tmp_path, monkeypatch):
    import torch

    monkeypatch.chdir(tmp_path)
    torch.save(dead_relu_model(), tmp_path / "dead.pt")
    return "dead.pt"


@pytest.mark.parametrize("fmt", ["sarif", "junit", "github", "concise"])
def test_cli_prints_each_format_and_exit_zero_reports_without_failing(dead_file, capsys, fmt):
    assert main([dead_file, "--trust", "--format", fmt, "--exit-zero"]) == 0
    printed = capsys.readouterr().out
    assert "dead.pt" in printed and "MC101" in printed


def test_cli_writes_sarif_to_a_file_and_exits_one_on_findings(dead_file, tmp_path, capsys):
    out = tmp_path / "out.sarif"
    assert main([dead_file, "--trust", "--format", "sarif", "-o", str(out)]) == 1
    assert capsys.readouterr().out == ""
    jsonschema.Draft7Validator(SCHEMA).validate(json.loads(out.read_text()))


def test_cli_statistics_prints_counts_per_rule(dead_file, capsys):
    assert main([dead_file, "--trust", "--statistics"]) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["1", "MC101", "dead-units"]
    assert "Found" not in out


def test_cli_statistics_refuses_formats_it_cannot_count_in(dead_file, capsys):
    assert main([dead_file, "--trust", "--statistics", "--format", "sarif"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "modelcheck: error: --statistics works with --format text, concise, json, not sarif"
    ]
