"""Rule files as data: the contract every built-in rule meets, and errors that name the
file and key when a rule file is wrong."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from models import dead_relu_model, gaussian, mlp

import modelcheck
from modelcheck import rules
from modelcheck.errors import ConfigError, RuleError

CORE_SLUGS = {
    "dead-units", "saturation", "exploding-activations", "vanishing-activations",
    "kurtosis-growth", "vanishing-gradients", "exploding-gradients", "nonfinite",
    "poor-initialization", "unscaled-input", "collapsed-output",
}  # fmt: skip

BUILTIN = rules.builtin_rules()


def test_the_eleven_core_rules_are_built_in():
    assert {r.slug for r in BUILTIN} == CORE_SLUGS


@pytest.mark.parametrize("rule", BUILTIN, ids=lambda r: r.slug)
def test_every_rule_documents_itself_and_has_a_stable_identity(rule):
    assert re.fullmatch(r"MC\d{3}", rule.code)
    assert re.fullmatch(r"[a-z]+(-[a-z]+)*", rule.slug)
    assert rule.path.endswith(f"{rule.slug}.toml")
    assert rule.title and rule.what and rule.why and rule.example
    assert rule.fixes and rule.references
    assert rule.status == "stable"


def test_codes_and_slugs_are_unique():
    assert len({r.code for r in BUILTIN}) == len({r.slug for r in BUILTIN}) == len(BUILTIN)


MINIMAL = """
code = "XX900"
slug = "wide-layers"
title = "Layers wider than a limit"
what = "Finds wide layers."
why = "Because."
scope = "layer"
value = "units"
condition = "value > threshold"
message = "{units} units"
references = []
[thresholds]
warning = 10
"""


def write_rule(tmp_path, text, name="wide-layers.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_team_rule_file_adds_a_new_rule(tmp_path):
    path = write_rule(tmp_path, MINIMAL)
    report = modelcheck.check(
        dead_relu_model(), gaussian(), extend_rules=[str(path)], select=["XX9"]
    )
    assert {f.layer for f in report.findings} == {"0", "1", "2", "3"}
    assert all(f.rule == "wide-layers" for f in report.findings)


def readme_rule() -> str:
    """The example rule file of README.md's 'Writing a rule'."""
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("### Writing a rule") :]
    return section[section.index("```toml\n") + 8 : section.index("```\n", 1)]


@pytest.mark.parametrize(("scale", "expected"), [(1.0, []), (1e4, [("2", "warning")])])
def test_the_readme_example_rule_loads_and_fires_where_outputs_near_float16s_limit(
    tmp_path, scale, expected
):
    path = write_rule(tmp_path, readme_rule(), "fp16-overflow.toml")
    model = mlp([8, 32, 3])
    with torch.no_grad():
        model[2].weight.mul_(scale)
    report = modelcheck.check(model, gaussian(), extend_rules=[str(path)], select=["TM101"])
    assert [(f.layer, f.severity) for f in report.findings] == expected
    if expected:
        largest = report.layer("2").activation
        assert report.findings[0].value == max(abs(largest.min), abs(largest.max))


@pytest.mark.parametrize(
    ("change", "needles"),
    [
        (('value = "units"', 'value = "unitz"'), ["value", "unitz", "units"]),
        (('condition = "value > threshold"', 'condition = "value.real > 1"'), ["condition"]),
        (('message = "{units} units"', 'message = "{nope} units"'), ["message", "nope"]),
        (('code = "XX900"', 'code = "bad"'), ["code"]),
        (('scope = "layer"', 'scope = "galaxy"'), ["scope"]),
        (("warning = 10", "fatal = 10"), ["thresholds"]),
        (('title = "Layers wider than a limit"', 'titel = "x"'), ["titel"]),
        (('why = "Because."', 'why = "Because.'), ["invalid TOML"]),
    ],
    ids=[
        "unknown-metric",
        "attribute-access",
        "template-field",
        "code",
        "scope",
        "severity",
        "unknown-key",
        "toml-syntax",
    ],
)
def test_bad_rule_files_fail_at_load_naming_file_and_key(tmp_path, change, needles):
    path = write_rule(tmp_path, MINIMAL.replace(*change))
    with pytest.raises(RuleError) as caught:
        rules.load_rule_file(path)
    message = str(caught.value)
    assert str(path) in message and "\n" not in message
    for needle in needles:
        assert needle in message


def test_duplicate_codes_are_rejected(tmp_path):
    a = write_rule(tmp_path, MINIMAL, "a.toml")
    b = write_rule(tmp_path, MINIMAL.replace("wide-layers", "other-layers"), "b.toml")
    with pytest.raises(RuleError, match="XX900 is already defined"):
        rules.load_rules([a, b])


def test_threshold_and_parameter_overrides_change_the_verdict():
    model = dead_relu_model(0.75)
    assert (
        modelcheck.check(model, gaussian(), select=["dead-units"]).findings[0].severity == "error"
    )
    relaxed = modelcheck.check(
        model, gaussian(), select=["dead-units"], rules={"dead-units": {"error": 0.8}}
    )
    assert relaxed.findings[0].severity == "warning"
    assert relaxed.findings[0].threshold == 0.25


def test_unknown_override_key_names_the_rule_and_known_keys():
    with pytest.raises(ConfigError, match="unknown key 'eror' for rule dead-units"):
        modelcheck.check(dead_relu_model(), gaussian(), rules={"dead-units": {"eror": 0.8}})


def test_select_ignore_and_per_layer_ignores():
    model = dead_relu_model(0.75)
    ignored = modelcheck.check(model, gaussian(), ignore=["MC1"])
    assert ignored.findings and not [f for f in ignored.findings if f.code.startswith("MC1")]
    report = modelcheck.check(model, gaussian(), per_layer_ignores={"3": ["dead-units"]})
    assert not [f for f in report.findings if f.rule == "dead-units"]
    with pytest.raises(ConfigError, match="did you mean 'dead-units'"):
        modelcheck.check(model, gaussian(), select=["dead-unit"])


def test_messages_render_missing_values_as_not_applicable():
    assert rules.render("{a} and {b:.2f}", {"a": None, "b": 1.2345}) == "n/a and 1.23"
