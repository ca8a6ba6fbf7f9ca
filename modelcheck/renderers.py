"""Turn a Report into what a reader or a CI system wants: text, concise, JSON, SARIF,
JUnit XML, GitHub workflow annotations, and per-rule statistics.

Renderers only read the report. Each takes a Report (and options) and returns a string;
writing it anywhere is the caller's business. A model file has no lines, so CI formats
locate a finding by the model file plus the layer name (a SARIF logical location and
fingerprint, a JUnit test case, an annotation title).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import string
import urllib.parse
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Mapping
from pathlib import Path, PurePath

from modelcheck.report import Report, number
from modelcheck.rules import SEVERITIES, Finding, Rule, severity_rank
from modelcheck.rules import render as fill_template

FORMATS = ("text", "concise", "json", "sarif", "junit", "github")
STATISTICS_FORMATS = ("text", "concise", "json")
SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"


def render(report: Report, fmt: str, *, show_fixes: bool = False) -> str:
    if fmt == "json":
        return report.to_json() + "\n"
    renderer = _RENDERERS.get(fmt)
    if renderer is None:
        return render_text(report, show_fixes=show_fixes)
    return renderer(report)


def printable(text: str) -> str:
    """``text`` with control and invisible characters written as escapes (``\\n``,
    ``\\x1b``, ``\\u202e``).

    Module names, keys and class names come from the model file. Shown raw, a newline
    could forge a second line (a ``::error::`` command to a CI log reader) and an escape
    sequence could rewrite the terminal.
    """
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text
    )


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
    return f"{where}  {f.code} {f.rule}  {f.severity}  {_measured(f)}{f.message}"


def _measured(f: Finding) -> str:
    # An infinite threshold (kurtosis-growth's info level) bounds nothing worth printing.
    if f.value is not None and f.threshold is not None and math.isfinite(f.threshold):
        return f"{format_number(f.value)} vs {format_number(f.threshold)} — "
    if f.value is not None:
        return f"{format_number(f.value)} — "
    return ""


def counts_text(counts: Mapping[str, int]) -> str:
    """``1 error, 2 warnings, 0 infos`` from a summary's counts."""
    return ", ".join(
        [
            _plural(counts["errors"], "error"),
            _plural(counts["warnings"], "warning"),
            _plural(counts["infos"], "info"),
        ]
    )


def summary_line(report: Report) -> str:
    model, probe = report.model, report.probe
    scope = (
        f"{_plural(len(report.layers), 'layer')} of {model.type} ({model.parameters:,} "
        f"parameters); probe: {probe.source}, {_plural(probe.samples, 'sample')}, loss {probe.loss}"
    )
    verdict = "passed" if report.ok else f"failed at --fail-on {report.fail_on}"
    if not report.findings:
        return f"All checks passed: {scope}."
    return f"Found {counts_text(report.summary)} in {scope} — {verdict}."


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def render_text(report: Report, *, show_fixes: bool = False, max_fixes: int | None = None) -> str:
    """One aligned line per finding, its fixes under it (all, or the first ``max_fixes``),
    and a summary line."""
    width = max((len(f.layer or "<model>") for f in report.findings), default=0)
    lines = []
    for f in report.findings:
        lines.append(finding_line(f, width))
        if show_fixes:
            lines += [f"{'':{width}}    fix: {fix}" for fix in f.fixes[:max_fixes]]
    lines += [f"note: {note}" for note in report.probe.notes]
    lines.append(summary_line(report))
    return "".join(printable(line) + "\n" for line in lines)


# -- concise: one grep-able line per finding ------------------------------------------------


def render_concise(report: Report) -> str:
    """``model.pt:layer: CODE slug severity value vs threshold — message``, like a compiler
    diagnostic, then the counts."""
    source = report.model.source
    lines = [
        f"{source}:{f.layer or '<model>'}: {f.code} {f.rule} {f.severity} {_measured(f)}{f.message}"
        for f in report.findings
    ]
    lines.append(
        f"Found {counts_text(report.summary)}." if report.findings else "All checks passed!"
    )
    return "".join(printable(line) + "\n" for line in lines)


# -- statistics: how often each rule fired ------------------------------------------------


def render_statistics(report: Report, fmt: str = "text") -> str:
    """Findings counted per rule, most frequent first (``--statistics``, as in ruff)."""
    counts = Counter(f.code for f in report.findings)
    worst: dict[str, Finding] = {}
    for f in report.findings:
        if f.code not in worst or severity_rank(f.severity) > severity_rank(worst[f.code].severity):
            worst[f.code] = f
    rows = [
        {"code": code, "rule": worst[code].rule, "count": n, "severity": worst[code].severity}
        for code, n in sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    ]
    if fmt == "json":
        return json.dumps(rows, indent=2) + "\n"
    width = max((len(str(r["count"])) for r in rows), default=1)
    slug_width = max((len(r["rule"]) for r in rows), default=0)
    return "".join(
        f"{r['count']:>{width}}  {r['code']}  {r['rule']:<{slug_width}}  {r['severity']}\n"
        for r in rows
    )


# -- GitHub Actions workflow commands -----------------------------------------------------

_GITHUB_LEVEL = {"error": "error", "warning": "warning", "info": "notice"}


def render_github(report: Report) -> str:
    """One ``::error file=…,title=…::message`` workflow command per finding: GitHub shows
    them as annotations on the run and, when the model file is in the pull request, on it."""
    lines = []
    for f in report.findings:
        properties = {"title": f"{f.code} {f.rule} ({f.layer or 'model'})"}
        path = _repository_path(report.model.source)
        if path is not None:
            properties = {"file": path, **properties}
        text = f"{f.layer or '<model>'}: {_measured(f)}{f.message}"
        if f.fixes:
            text += f"\nfix: {f.fixes[0]}"
        props = ",".join(f"{k}={_escape_property(v)}" for k, v in properties.items())
        lines.append(f"::{_GITHUB_LEVEL[f.severity]} {props}::{_escape_data(text)}")
    return "".join(printable(line) + "\n" for line in lines)


def _escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


def _repository_path(source: str) -> str | None:
    """The model file as a forward-slash path relative to the working directory (the
    repository root in CI), or None for an in-memory module."""
    if source.startswith("<"):  # "<in-memory module>"
        return None
    path = Path(source)
    if path.is_absolute():
        try:
            path = path.relative_to(Path.cwd())
        except ValueError:
            return path.as_posix()
    return PurePath(path).as_posix()


# -- SARIF 2.1.0 ----------------------------------------------------------------------------

_SARIF_LEVEL = {"error": "error", "warning": "warning", "info": "note"}


def render_sarif(report: Report) -> str:
    """A SARIF 2.1.0 log with one run: every checked rule with its documentation, and
    one result per finding located at the model file and, logically, at its layer."""
    rules = [_sarif_rule(r) for r in report.rules]
    for f in report.findings:  # a report built by hand may lack the rule of a finding
        if f.code not in {r["id"] for r in rules}:
            rules.append({"id": f.code, "name": f.rule, "shortDescription": {"text": f.title}})
    index = {r["id"]: i for i, r in enumerate(rules)}
    log = {
        "$schema": SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": "modelcheck",
                        "version": report.version,
                        "semanticVersion": report.version,
                        "rules": rules,
                    }
                },
                "invocations": [{"executionSuccessful": True}],
                "results": [_sarif_result(report, f, index[f.code]) for f in report.findings],
                "properties": {
                    "model": report.model.description,
                    "probe": report.probe.source,
                    "samples": report.probe.samples,
                    "failOn": report.fail_on,
                    "ok": report.ok,
                },
            }
        ],
    }
    return json.dumps(log, indent=2, allow_nan=False) + "\n"


def _sarif_rule(rule: Rule) -> dict:
    fixes = [_generic(fix.text) for fix in rule.fixes]
    help_text = " ".join(rule.why.split())
    markdown = help_text
    if fixes:
        help_text += "\n\nHow to fix:\n" + "\n".join(f"- {fix}" for fix in fixes)
        markdown += "\n\n**How to fix**\n\n" + "\n".join(f"- {fix}" for fix in fixes)
    severities = _severities(rule)
    entry = {
        "id": rule.code,
        "name": rule.slug,
        "shortDescription": {"text": rule.title},
        "fullDescription": {"text": " ".join(rule.what.split())},
        "help": {"text": help_text, "markdown": markdown},
        "defaultConfiguration": {
            "level": _SARIF_LEVEL[max(severities, key=severity_rank)] if severities else "warning"
        },
        "properties": {"tags": ["model-health"]},
    }
    if rule.thresholds:
        entry["properties"]["thresholds"] = {
            severity: value if math.isfinite(value) else str(value)
            for severity, value in rule.thresholds.items()
        }
    return entry


def _severities(rule: Rule) -> list[str]:
    found = []
    for check in rule.checks:
        found += list(check.thresholds) if check.thresholds else [check.severity]
    return [s for s in found if s in SEVERITIES]


def _sarif_result(report: Report, f: Finding, rule_index: int) -> dict:
    text = f"{f.layer or '<model>'}: {_measured(f)}{f.message}"
    if f.fixes:
        text += f"\nFix: {f.fixes[0]}"
    location: dict = {}
    path = _repository_path(report.model.source)
    if path is not None:
        # GitHub code scanning shows a result only with region.startLine; a model file has
        # no lines, so results point at its start and the layer is the logical location.
        location["physicalLocation"] = {
            "artifactLocation": {"uri": _uri(path)},
            "region": {"startLine": 1},
        }
    layer = f.layer or "<model>"
    location["logicalLocations"] = [
        {"name": layer, "fullyQualifiedName": layer, "kind": "module" if f.layer else "object"}
    ]
    return {
        "ruleId": f.code,
        "ruleIndex": rule_index,
        "level": _SARIF_LEVEL[f.severity],
        "message": {"text": text},
        "locations": [location],
        "partialFingerprints": {"modelcheckRuleLayer/v1": fingerprint(f.code, f.layer)},
        "properties": {
            "rule": f.rule,
            "severity": f.severity,
            "layer": f.layer,
            "value": number(f.value),
            "threshold": number(f.threshold),
            "fixes": list(f.fixes),
        },
    }


def fingerprint(code: str, layer: str | None) -> str:
    """Stable across runs and value changes: the same rule on the same layer is the same
    alert, however far the value moved."""
    return hashlib.sha256(f"{code}\0{layer or ''}".encode()).hexdigest()[:32]


def _uri(path: str) -> str:
    if re.match(r"^[A-Za-z]:|^/", path):
        return Path(path).as_uri()
    return urllib.parse.quote(path, safe="/")


class _Names(dict):
    """Template fields shown as ``<name>`` where a rule's help speaks of no layer yet."""

    def get(self, key: str, default: object = None) -> str:
        return f"<{key}>"


def _generic(template: str) -> str:
    names = [n for _, n, _, _ in string.Formatter().parse(template) if n is not None]
    return fill_template(template, _Names.fromkeys(names))


# -- JUnit XML ----------------------------------------------------------------------------

_XML_INVALID = re.compile("[^\u0009\u000a\u000d\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def render_junit(report: Report) -> str:
    """One test case per rule × layer checked (the model for model-wide checks), a
    ``<failure>`` for each finding, so ``tests`` and ``failures`` count pairs and findings."""
    cases = _junit_cases(report)
    failures = sum(1 for _, finding in cases if finding is not None)
    suite_name = f"modelcheck {report.model.source}"
    root = ET.Element(
        "testsuites", name="modelcheck", tests=str(len(cases)), failures=str(failures)
    )
    root.set("errors", "0")
    suite = ET.SubElement(
        root,
        "testsuite",
        name=_xml(suite_name),
        tests=str(len(cases)),
        failures=str(failures),
        errors="0",
        skipped="0",
        timestamp=report.created[:19],
    )
    properties = ET.SubElement(suite, "properties")
    for name, value in (
        ("model", report.model.description),
        ("probe", report.probe.source),
        ("samples", str(report.probe.samples)),
        ("fail-on", report.fail_on),
        ("modelcheck", report.version),
        ("torch", report.torch_version),
    ):
        ET.SubElement(properties, "property", name=name, value=_xml(value))
    slugs = {r.code: r.slug for r in report.rules}
    path = _repository_path(report.model.source)
    for (code, layer), finding in cases:
        slug = slugs.get(code) or (finding.rule if finding else code)
        case = ET.SubElement(
            suite, "testcase", classname=f"modelcheck.{code}.{slug}", name=_xml(layer or "<model>")
        )
        if path is not None:
            case.set("file", _xml(path))
        if finding is not None:
            failure = ET.SubElement(
                case,
                "failure",
                type=finding.severity,
                message=_xml(f"{finding.severity}: {_measured(finding)}{finding.message}"),
            )
            failure.text = _xml(
                "\n".join([finding_line(finding), *(f"fix: {fix}" for fix in finding.fixes)])
            )
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, "unicode") + "\n"


def _junit_cases(report: Report) -> list[tuple[tuple[str, str | None], Finding | None]]:
    """Checked pairs in order, each with its finding or None. A finding fails its own
    (rule, layer) case, else its rule's model-wide case (a model-scope rule that points
    at a layer), else a case of its own: every finding is exactly one failure."""
    cases: dict[tuple[str, str | None], Finding | None] = dict.fromkeys(report.checked)
    for f in report.findings:
        key = next(
            (k for k in ((f.code, f.layer), (f.code, None)) if k in cases and cases[k] is None),
            (f.code, f.layer),
        )
        while cases.get(key) is not None:
            key = (f.code, f"{key[1] or '<model>'} (again)")
        cases[key] = f
    return list(cases.items())


def _xml(text: str) -> str:
    """Characters XML 1.0 cannot hold (control characters in a module name) become U+FFFD."""
    return _XML_INVALID.sub("\ufffd", text)


_RENDERERS = {
    "concise": render_concise,
    "sarif": render_sarif,
    "junit": render_junit,
    "github": render_github,
}
