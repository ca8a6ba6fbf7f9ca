"""Declarative health rules: load them from TOML and evaluate them over metrics.

A rule is data. Its file gives identity (code, slug), documentation (what, why,
example, fixes, references) and one or more checks: where the check applies, the value
it measures, the condition that makes a finding, and either thresholds per severity
(bound to ``threshold`` in the condition) or one fixed severity. Expressions are parsed
by ``modelcheck.expr`` against the metric names of their scope when the rule loads, so
a typo fails at once, naming the file and key, never half-way through a check.
"""

from __future__ import annotations

import difflib
import functools
import glob
import math
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import tomllib

from modelcheck import expr
from modelcheck.errors import ConfigError, RuleError
from modelcheck.metrics import LAYER_METRICS, MODEL_METRICS, PARAMETER_METRICS, Metrics
from modelcheck.settings import Settings

SEVERITIES = ("error", "warning", "info")
SCOPES = ("model", "layer", "parameter")
_RANK = {s: i for i, s in enumerate(reversed(SEVERITIES), start=1)}

# Names every finding's message and fixes may use besides the metrics of its scope.
_FINDING_NAMES: Mapping[str, str] = {
    "value": "the check's value (in conditions too)",
    "threshold": "the threshold of the severity reached (in conditions too)",
    "severity": "error, warning or info",
    "layer": "the layer's name; a model check's 'at', else None",
    "deeper": "how many more layers a report-first (or -last) check found",
    "also": "' (and N more layers)' when there are, else ''",
    "worst_layer": "the layer where the value is furthest past its threshold",
    "worst_value": "the value there",
}
NAMES_BY_SCOPE: Mapping[str, tuple[str, Mapping[str, str]]] = {
    "model": ("Model metrics: every check can use them", MODEL_METRICS),
    "layer": ("Layer metrics: checks of scope layer or parameter", LAYER_METRICS),
    "parameter": (
        "Parameter metrics: checks of scope parameter, a row per weight tensor",
        PARAMETER_METRICS,
    ),
    "finding": ("Finding fields: messages and fixes", _FINDING_NAMES),
    "functions": ("Functions", expr.FUNCTIONS),
}
"""What ``modelcheck metrics`` lists: each scope's names, the finding's, the functions."""

_REPORTS = ("each", "first", "last")
_RULE_KEYS = {
    "code",
    "slug",
    "title",
    "status",
    "what",
    "why",
    "example",
    "fixes",
    "references",
    "params",
    "checks",
}
_CHECK_KEYS = {
    "scope",
    "applies-to",
    "value",
    "condition",
    "thresholds",
    "severity",
    "message",
    "report",
    "at",
}


def severity_rank(severity: str) -> int:
    """error 3, warning 2, info 1: larger is worse."""
    return _RANK[severity]


@dataclass(frozen=True, slots=True)
class Check:
    scope: str
    applies_to: expr.Expression | None
    value: expr.Expression
    condition: expr.Expression
    thresholds: Mapping[str, float]
    severity: str | None
    message: str
    report: str  # "each" layer, or once at the "first" (or "last") layer that crosses
    at: expr.Expression | None  # the layer a model-scope finding points at


@dataclass(frozen=True, slots=True)
class Fix:
    text: str
    when: expr.Expression | None


@dataclass(frozen=True, slots=True)
class Rule:
    code: str
    slug: str
    title: str
    status: str
    what: str
    why: str
    example: str
    fixes: tuple[Fix, ...]
    references: tuple[str, ...]
    params: Mapping[str, float]
    checks: tuple[Check, ...]
    path: str

    @property
    def thresholds(self) -> Mapping[str, float]:
        """The thresholds of the rule's one thresholded check (empty if none)."""
        return next((c.thresholds for c in self.checks if c.thresholds), {})

    def with_overrides(self, overrides: Mapping[str, object], where: str) -> Rule:
        """A copy with thresholds (``error = 0.6``) and params replaced."""
        thresholds, params = dict(self.thresholds), dict(self.params)
        for key, value in overrides.items():
            name = key.replace("-", "_")
            if key in SEVERITIES:
                thresholds[key] = _number(value, f"{where}.{key}")
            elif name in params:
                params[name] = _number(value, f"{where}.{key}")
            else:
                known = ", ".join([*SEVERITIES, *params]) or "severities"
                raise ConfigError(
                    f"{where}: unknown key {key!r} for rule {self.slug} (known: {known})"
                )
        checks = tuple(
            replace(c, thresholds=thresholds) if c.thresholds else c for c in self.checks
        )
        if thresholds and not any(c.thresholds for c in self.checks):
            raise ConfigError(f"{where}: rule {self.slug} has no thresholds to override")
        return replace(self, checks=checks, params=params)


@dataclass(frozen=True, slots=True)
class Finding:
    """One health problem: which rule, how bad, where, by how much, and what to try."""

    code: str
    rule: str
    severity: str
    layer: str | None
    value: float | None
    threshold: float | None
    message: str
    fixes: tuple[str, ...]
    title: str
    deeper: int = 0
    related: tuple[str, ...] = field(default=())


# -- loading -----------------------------------------------------------------------------


def builtin_rules_dir() -> Path:
    from modelcheck._resources import data_dir

    return data_dir("rules")


def load_rule_set(settings: Settings) -> tuple[Rule, ...]:
    """Built-in rules plus ``extend_rules`` files, with per-rule overrides applied."""
    paths = sorted(builtin_rules_dir().glob("*.toml"))
    for pattern in settings.extend_rules:
        matched = sorted(Path(p) for p in glob.glob(pattern))
        if not matched:
            raise ConfigError(f"extend-rules: {pattern!r} matches no rule file")
        paths += matched
    every = load_rules(paths)
    overridden = []
    for rule in every:
        overrides = {}
        for key, values in settings.rules.items():
            if key in (rule.slug, rule.code):
                overrides.update(values)
        overridden.append(
            rule.with_overrides(overrides, f"rules.{rule.slug}") if overrides else rule
        )
    known = {r.slug for r in every} | {r.code for r in every}
    for key in settings.rules:
        if key not in known:
            resolve(every, key, "rules")  # raises with a suggestion
    return tuple(overridden)


def load_rule_file(path: Path) -> Rule:
    """The rule in ``path``, parsed once per version of the file (rules are immutable data,
    and a test session checks many models against the same files)."""
    try:
        stat = Path(path).stat()
    except OSError as error:
        raise RuleError(f"{path}: cannot read rule file ({error.strerror or error})") from None
    return _load_rule_file(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=512)
def _load_rule_file(where: str, mtime_ns: int, size: int) -> Rule:
    path = Path(where)
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text)
    except OSError as error:
        raise RuleError(f"{where}: cannot read rule file ({error.strerror or error})") from None
    except UnicodeDecodeError as error:
        raise RuleError(f"{where}: not a TOML rule file (not UTF-8 text: {error.reason})") from None
    except tomllib.TOMLDecodeError as error:
        found = re.search(r" \(at line (\d+), column \d+\)", str(error))
        if found is None:
            raise RuleError(f"{where}: invalid TOML: {error}") from None
        reason = str(error).replace(found.group(0), "")
        raise RuleError(f"{where}:{found.group(1)}: invalid TOML: {reason}") from None
    try:
        return parse_rule(data, where)
    except (RuleError, ConfigError) as error:
        raise type(error)(_with_line(str(error), where, text)) from None


# What a parse_rule message says after "FILE: ": an optional array entry ("checks[1]: "),
# then the key it is about, in one of the few ways the messages name one.
_ENTRY = re.compile(r"(checks|fixes)\[(\d+)\]: ")
_NAMED_KEY = re.compile(
    r"unknown (?:check )?key '(?P<a>[\w-]+)'|missing or empty '(?P<b>[\w-]+)'"
    r"|^'(?P<c>[\w-]+)' must|^(?P<d>[\w-]+)(?:\.(?P<sub>[\w-]+))?\b"
)


def _with_line(message: str, where: str, text: str) -> str:
    """``message`` as ``FILE:LINE: ...`` when the line of the key it names can be found."""
    if not message.startswith(where + ": "):
        return message
    rest = message[len(where) + 2 :]
    entry = _ENTRY.match(rest)
    named = _NAMED_KEY.search(rest[entry.end() :] if entry else rest)
    key = sub = None
    if named:
        key = named.group("a") or named.group("b") or named.group("c") or named.group("d")
        sub = named.group("sub")
    if key not in _RULE_KEYS | _CHECK_KEYS and not (named and named.group("a")):
        key = sub = None  # a word of the message, not a key
    section = (entry.group(1), int(entry.group(2))) if entry else None
    line = _line_of(text.splitlines(), section, key, sub)
    return message if line is None else f"{where}:{line}: {rest}"


def _line_of(
    lines: list[str], section: tuple[str, int] | None, key: str | None, sub: str | None
) -> int | None:
    """1-based line of ``key`` (or ``key.sub``) in a rule file, found the way TOML lays out
    a rule: top-level keys, ``[table]`` headers, and ``[[checks]]``/``[[fixes]]`` entries."""
    code = _code_lines(lines)
    start, end = 0, len(lines)
    if section is not None:
        name, index = section
        entries = [i for i in code if lines[i].strip() == f"[[{name}]]"]
        if index >= len(entries):
            return None
        start = entries[index]
        end = next((i for i in code if i > start and lines[i].lstrip().startswith("[[")), end)
    else:
        end = next((i for i in code if lines[i].lstrip().startswith("[")), end)
    if key is None:
        return start + 1 if section else None
    prefix = f"{section[0]}." if section else ""
    table = next((i for i in code if lines[i].strip() == f"[{prefix}{key}]" and i >= start), None)
    if table is not None:
        after = next((i for i in code if i > table and lines[i].lstrip().startswith("[")), None)
        found = _assignment(lines, code, sub, table + 1, after or len(lines)) if sub else None
        return (found if found is not None else table) + 1
    found = _assignment(lines, code, key, start, end)
    if found is None:
        return start + 1 if section else None
    return found + 1


def _assignment(lines: list[str], code: list[int], key: str, start: int, end: int) -> int | None:
    pattern = re.compile(rf"\s*[\"']?{re.escape(key)}[\"']?\s*=")
    return next((i for i in code if start <= i < end and pattern.match(lines[i])), None)


def _code_lines(lines: list[str]) -> list[int]:
    """Indices of lines that are not inside a multi-line string."""
    code, inside = [], None
    for i, line in enumerate(lines):
        if inside is None:
            code.append(i)
        for quote in ('"""', "'''"):
            if (inside in (None, quote)) and line.count(quote) % 2 == 1:
                inside = None if inside == quote else quote
                break
    return code


def parse_rule(data: Mapping[str, object], where: str) -> Rule:
    checks_data = data.get("checks")
    flat = {k: v for k, v in data.items() if k in _CHECK_KEYS}
    if checks_data is None:
        checks_data = [flat]
    elif flat:
        raise RuleError(
            f"{where}: give either [[checks]] or a single flat check, not both "
            f"(found {', '.join(sorted(flat))})"
        )
    unknown = set(data) - _RULE_KEYS - _CHECK_KEYS
    if unknown:
        raise RuleError(
            f"{where}: unknown key {sorted(unknown)[0]!r}; "
            f"rule keys are {', '.join(sorted(_RULE_KEYS | _CHECK_KEYS))}"
        )
    slug = _text(data, "slug", where)
    if not slug.replace("-", "").isalnum() or slug != slug.lower():
        raise RuleError(f"{where}: slug {slug!r} must be kebab-case (dead-units)")
    code = _text(data, "code", where)
    if not (code[:2].isalpha() and code[:2].isupper() and code[2:].isdigit()):
        raise RuleError(f"{where}: code {code!r} must look like MC101")
    params = {
        k.replace("-", "_"): _number(v, f"{where}: params.{k}")
        for k, v in _table(data, "params", where).items()
    }
    if not isinstance(checks_data, list) or not checks_data:
        raise RuleError(f"{where}: 'checks' must be a non-empty array of tables")
    checks = tuple(
        _parse_check(c, params, f"{where}: checks[{i}]" if "checks" in data else where)
        for i, c in enumerate(checks_data)
    )
    if sum(1 for c in checks if c.thresholds) > 1:
        raise RuleError(f"{where}: at most one check may have thresholds")
    names = _scope_names(max(checks, key=lambda c: SCOPES.index(c.scope)).scope, params)
    fixes = tuple(
        _parse_fix(f, names, f"{where}: fixes[{i}]")
        for i, f in enumerate(_list(data, "fixes", where))
    )
    return Rule(
        code=code,
        slug=slug,
        title=_text(data, "title", where),
        status=str(data.get("status", "stable")),
        what=_text(data, "what", where),
        why=_text(data, "why", where),
        example=str(data.get("example", "")),
        fixes=fixes,
        references=tuple(str(r) for r in _list(data, "references", where)),
        params=params,
        checks=checks,
        path=where,
    )


def _scope_names(scope: str, params: Mapping[str, float]) -> set[str]:
    names = set(MODEL_METRICS) | set(params) | set(_FINDING_NAMES)
    if scope in ("layer", "parameter"):
        names |= set(LAYER_METRICS)
    if scope == "parameter":
        names |= set(PARAMETER_METRICS)
    return names


def _parse_check(data: object, params: Mapping[str, float], where: str) -> Check:
    if not isinstance(data, Mapping):
        raise RuleError(f"{where}: a check must be a table")
    unknown = set(data) - _CHECK_KEYS
    if unknown:
        raise RuleError(f"{where}: unknown check key {sorted(unknown)[0]!r}")
    scope = str(data.get("scope", "layer"))
    if scope not in SCOPES:
        raise RuleError(f"{where}: scope {scope!r} must be one of {', '.join(SCOPES)}")
    report = str(data.get("report", "each"))
    if report not in _REPORTS or (report != "each" and scope != "layer"):
        raise RuleError(f"{where}: report must be 'each', or 'first'/'last' for a layer check")
    thresholds = {
        k: _number(v, f"{where}: thresholds.{k}")
        for k, v in _table(data, "thresholds", where).items()
    }
    if set(thresholds) - set(SEVERITIES):
        raise RuleError(f"{where}: thresholds may only name {', '.join(SEVERITIES)}")
    severity = data.get("severity")
    if (severity is None) == (not thresholds):
        raise RuleError(f"{where}: give either thresholds or one fixed severity")
    if severity is not None and severity not in SEVERITIES:
        raise RuleError(f"{where}: severity {severity!r} must be one of {', '.join(SEVERITIES)}")
    names = _scope_names(scope, params)
    value_names = names - {"value", "threshold"}
    if not thresholds:
        names = names - {"threshold"}
    applies = data.get("applies-to")
    at = data.get("at")
    if at is not None and scope != "model":
        raise RuleError(f"{where}: 'at' names the layer of a model-scope finding only")
    check = Check(
        scope=scope,
        applies_to=None
        if applies is None
        else _expression(applies, value_names, f"{where}: applies-to"),
        value=_expression(_text(data, "value", where), value_names, f"{where}: value"),
        condition=_expression(_text(data, "condition", where), names, f"{where}: condition"),
        thresholds=thresholds,
        severity=severity,
        message=_text(data, "message", where),
        report=report,
        at=None if at is None else _expression(at, value_names, f"{where}: at"),
    )
    _check_template(check.message, names, f"{where}: message")
    return check


def _parse_fix(data: object, names: set[str], where: str) -> Fix:
    if isinstance(data, str):
        data = {"text": data}
    if not isinstance(data, Mapping) or set(data) - {"text", "when"}:
        raise RuleError(f"{where}: a fix is a string or a table with 'text' and 'when'")
    text = _text(data, "text", where)
    _check_template(text, names, f"{where}: text")
    when = data.get("when")
    return Fix(text=text, when=None if when is None else _expression(when, names, f"{where}: when"))


def _expression(source: object, names: set[str], where: str) -> expr.Expression:
    if not isinstance(source, str):
        raise RuleError(f"{where}: must be an expression string")
    return expr.parse(source, known_names=names, where=where)


def _check_template(template: str, names: set[str], where: str) -> None:
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as error:
        raise RuleError(f"{where}: bad template {template!r}: {error}") from None
    for name in fields:
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise RuleError(f"{where}: unknown field {{{name}}} in {template!r}{hint}")


def _text(data: Mapping, key: str, where: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value.strip():
        raise RuleError(f"{where}: missing or empty '{key}'")
    return value.strip()


def _table(data: Mapping, key: str, where: str) -> Mapping:
    value = data.get(key, {})
    if not isinstance(value, Mapping):
        raise RuleError(f"{where}: '{key}' must be a table")
    return value


def _list(data: Mapping, key: str, where: str) -> list:
    value = data.get(key, [])
    if not isinstance(value, list):
        raise RuleError(f"{where}: '{key}' must be an array")
    return value


def _number(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    return float(value)


def load_rules(paths: Iterable[Path]) -> tuple[Rule, ...]:
    rules = [load_rule_file(Path(p)) for p in paths]
    seen: dict[str, str] = {}
    for rule in rules:
        for key in (rule.code, rule.slug):
            if key in seen:
                raise RuleError(f"{rule.path}: {key} is already defined in {seen[key]}")
            seen[key] = rule.path
    return tuple(sorted(rules, key=lambda r: r.code))


def builtin_rules() -> tuple[Rule, ...]:
    return load_rules(sorted(builtin_rules_dir().glob("*.toml")))


# -- choosing ----------------------------------------------------------------------------


def resolve(rules: Sequence[Rule], selector: str, where: str) -> list[Rule]:
    """Rules named by a code, a code prefix (MC1), a slug, or ALL."""
    if selector == "ALL":
        return list(rules)
    chosen = [r for r in rules if r.slug == selector or r.code.startswith(selector)]
    if not chosen:
        known = [r.slug for r in rules] + [r.code for r in rules]
        close = difflib.get_close_matches(selector, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "; see `modelcheck rules`"
        raise ConfigError(f"{where}: unknown rule {selector!r}{hint}")
    return chosen


def select(
    rules: Sequence[Rule],
    select: Sequence[str] | None = None,
    ignore: Sequence[str] = (),
    where: str = "select",
) -> tuple[Rule, ...]:
    chosen = {r.code for s in (select or ["ALL"]) for r in resolve(rules, s, where)}
    dropped = {r.code for s in ignore for r in resolve(rules, s, "ignore")}
    return tuple(r for r in rules if r.code in chosen - dropped)


# -- evaluating --------------------------------------------------------------------------


def evaluate(
    rules: Sequence[Rule], metrics: Metrics
) -> tuple[list[Finding], list[tuple[str, str | None]]]:
    """Findings of every rule, worst first (a rule reports a layer at most once), and the
    (rule code, layer name) pairs the rules looked at, in rule and layer order.

    A check looks at a layer when its ``applies-to`` holds there (a dead-units check does
    not look at a Linear layer); a model-scope check looks at the model, layer None. CI
    formats that report passes as well as findings (JUnit) need this denominator.
    """
    rows = _rows(metrics)
    findings: list[Finding] = []
    looked_at: dict[tuple[str, str | None], None] = {}
    with np.errstate(all="ignore"):  # IEEE results, not warnings (see Expression.value_in)
        for rule in rules:
            findings += _findings_of(rule, rows, looked_at)
    return sort_findings(findings), list(looked_at)


def _findings_of(
    rule: Rule,
    rows: Mapping[str, Sequence[Mapping[str, object]]],
    looked_at: dict[tuple[str, str | None], None],
) -> Iterable[Finding]:
    """The rule's findings, one per layer at most: the most severe of its checks'."""
    found: dict[str | None, Finding] = {}
    for check in rule.checks:
        for finding in _run_check(rule, check, rows[check.scope], looked_at):
            kept = found.get(finding.layer)
            if kept is None or severity_rank(finding.severity) > severity_rank(kept.severity):
                found[finding.layer] = finding
    return found.values()


def _rows(metrics: Metrics) -> dict[str, list[Mapping[str, object]]]:
    """What a check of each scope evaluates, row by row: a layer's or a parameter's
    metrics see the model's too. Built once, for all the checks."""
    return {
        "model": [metrics.model],
        "layer": [{**metrics.model, **row} for row in metrics.layers],
        "parameter": [{**metrics.model, **row} for row in metrics.parameters],
    }


def sort_findings(findings: Iterable[Finding]) -> list[Finding]:
    return sorted(findings, key=lambda f: (-severity_rank(f.severity), f.code))


@dataclass(frozen=True, slots=True)
class _Hit:
    env: Mapping[str, object]
    severity: str
    value: object
    threshold: float | None


def _run_check(
    rule: Rule,
    check: Check,
    rows: Sequence[Mapping[str, object]],
    looked_at: dict[tuple[str, str | None], None],
) -> list[Finding]:
    """The check's findings over ``rows``; every row it applies to goes into ``looked_at``."""
    hits = []
    for row in rows:
        env = {**row, **rule.params}
        if check.applies_to is not None and not expr.truthy(check.applies_to.value_in(env)):
            continue
        looked_at[(rule.code, None if check.scope == "model" else str(env.get("name")))] = None
        if (hit := _hit(check, env)) is not None:
            hits.append(hit)
    if not hits:
        return []
    if check.report != "each":
        if check.report == "last":
            hits.reverse()
        return [_finding(rule, check, hits[0], _worst(hits), len(hits) - 1, hits)]
    return [_finding(rule, check, h, h, 0, [h]) for h in hits]


def _hit(check: Check, env: dict[str, object]) -> _Hit | None:
    value = check.value.value_in(env)
    env["value"] = value
    if not check.thresholds:
        if expr.truthy(check.condition.value_in(env)):
            return _Hit(env, check.severity, value, None)
        return None
    for severity in SEVERITIES:
        threshold = check.thresholds.get(severity)
        if threshold is None:
            continue
        if expr.truthy(check.condition.value_in({**env, "threshold": threshold})):
            return _Hit({**env, "threshold": threshold}, severity, value, threshold)
    return None


def _worst(hits: Sequence[_Hit]) -> _Hit:
    """The most severe hit; among equals, the value furthest past its threshold (all hits
    of one check cross it in the same direction, so that is the most extreme value)."""

    def distance(hit: _Hit) -> float:
        value = _plain_number(hit.value)
        if value is None or hit.threshold is None or not math.isfinite(hit.threshold):
            return 0.0
        return abs(value - hit.threshold)

    return max(hits, key=lambda h: (severity_rank(h.severity), distance(h)))


def _finding(
    rule: Rule, check: Check, first: _Hit, worst: _Hit, deeper: int, hits: Sequence[_Hit]
) -> Finding:
    if check.scope == "model":
        layer = None if check.at is None else check.at.evaluate(first.env)
    else:
        layer = first.env.get("name")
    context = {
        **first.env,
        "value": worst.value,
        "threshold": worst.threshold,
        "severity": worst.severity,
        "layer": layer,
        "deeper": deeper,
        "also": f" (and {deeper} more layer{'s' if deeper > 1 else ''})" if deeper else "",
        "worst_layer": worst.env.get("name"),
        "worst_value": worst.value,
    }
    fixes = tuple(
        render(f.text, context)
        for f in rule.fixes
        if f.when is None or expr.truthy(f.when.evaluate(context))
    )
    return Finding(
        code=rule.code,
        rule=rule.slug,
        severity=worst.severity,
        layer=None if layer is None else str(layer),
        value=_plain_number(worst.value),
        threshold=worst.threshold,
        message=render(check.message, context),
        fixes=fixes,
        title=rule.title,
        deeper=deeper,
        related=tuple(str(h.env.get("name")) for h in hits[1:]),
    )


def _plain_number(value: object) -> float | None:
    if isinstance(value, (bool, np.bool_)):
        return float(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    return None


def render(template: str, context: Mapping[str, object]) -> str:
    """Fill a message template; a value that does not apply reads 'n/a'."""
    parts = []
    for literal, name, spec, _ in string.Formatter().parse(template):
        parts.append(literal)
        if name is not None:
            parts.append(_format(context.get(name), spec or ""))
    return "".join(parts)


def _format(value: object, spec: str) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (tuple, list)):
        return ", ".join(str(v) for v in value)
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)
