"""``[tool.modelcheck]``: found from the working directory upwards or given with --config,
layered under the command line, and every mistake one line naming file, line and key."""

from __future__ import annotations

import textwrap

import pytest
import tomllib
import torch
from models import dead_relu_model

import modelcheck
from modelcheck import config
from modelcheck.cli import main
from modelcheck.errors import ConfigError, RuleError
from modelcheck.settings import Settings

WIDE_LAYERS_RULE = """
code = "XT900"
slug = "wide-layers"
title = "Layers wider than the team allows"
what = "Finds layers with more units than a limit."
why = "Our deployment target has little memory."
example = "0  XT900 wide-layers  warning  32 vs 16 — 32 units"
scope = "layer"
applies-to = "units is not None"
value = "units"
condition = "value > threshold"
message = "{units} units"
references = []
fixes = ["Use fewer units in {layer}."]
[thresholds]
warning = 16
"""


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project directory with a faulty model file, as the working directory."""
    monkeypatch.chdir(tmp_path)
    torch.save(dead_relu_model(), tmp_path / "dead.pt")
    return tmp_path


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# -- finding the file -------------------------------------------------------------------------


def test_nearest_pyproject_with_the_table_is_found_from_a_subdirectory(tmp_path):
    write(tmp_path / "pyproject.toml", '[tool.modelcheck]\nfail-on = "warning"\n')
    write(tmp_path / "pkg" / "pyproject.toml", '[project]\nname = "pkg"\n')  # no table: skipped
    start = tmp_path / "pkg" / "deep"
    start.mkdir()
    configured = config.load(start=start)
    assert configured.path == (tmp_path / "pyproject.toml").resolve()
    assert configured.settings.fail_on == "warning"


def test_no_configuration_file_means_the_built_in_defaults(tmp_path):
    configured = config.load(start=tmp_path)
    assert configured.path is None
    assert configured.settings == Settings()


def test_explicit_config_file_may_be_a_plain_toml_with_top_level_settings(tmp_path):
    path = write(tmp_path / "ci" / "modelcheck.toml", 'fail-on = "info"\nignore = ["MC2"]\n')
    configured = config.load(path)
    assert configured.settings.fail_on == "info"
    assert configured.settings.ignore == ("MC2",)


# -- precedence and what the settings do ------------------------------------------------------


def test_command_line_beats_config_file_beats_defaults(project, capsys):
    write(project / "pyproject.toml", '[tool.modelcheck]\nfail-on = "never"\nseed = 3\n')
    code, out, _ = run(["--show-settings", "--fail-on", "warning"], capsys)
    shown = tomllib.loads(out)["tool"]["modelcheck"]
    assert code == 0
    assert shown["fail-on"] == "warning"  # command line
    assert shown["seed"] == 3  # file
    assert shown["batch-size"] == Settings().batch_size  # default
    origins = {line.split("=")[0].strip(): line.rsplit("# ", 1)[1] for line in out.splitlines()[3:]}
    assert origins["fail-on"] == "command line"
    assert origins["seed"] == "pyproject.toml:3"
    assert origins["batch-size"] == "default"
    # and the settings are the ones the check runs with: the file says never fail ...
    assert run(["dead.pt", "--trust"], capsys)[0] == 0
    # ... and the command line overrides it
    assert run(["dead.pt", "--trust", "--fail-on", "error"], capsys)[0] == 1


def test_threshold_override_changes_the_severity(project):
    write(project / "pyproject.toml", "[tool.modelcheck.rules.dead-units]\nerror = 0.8\n")
    settings = config.load().settings
    dead = [f for f in modelcheck.check(dead_relu_model(), settings=settings).findings]
    finding = next(f for f in dead if f.rule == "dead-units")
    assert (finding.severity, finding.threshold) == ("warning", 0.25)


def test_per_layer_ignores_drop_a_rule_on_matching_layers_only(project):
    write(
        project / "pyproject.toml",
        '[tool.modelcheck]\nper-layer-ignores = { "3*" = ["dead-units"] }\n',
    )
    settings = config.load().settings
    report = modelcheck.check(dead_relu_model(), settings=settings)
    assert not [f for f in report.findings if f.rule == "dead-units"]
    assert ("MC101", "3") not in report.checked and ("MC101", "1") in report.checked
    assert [f.rule for f in report.findings] == ["exploding-activations"]


def test_a_team_rule_file_adds_a_rule_found_relative_to_the_config_file(project, monkeypatch):
    write(project / "health" / "wide-layers.toml", WIDE_LAYERS_RULE)
    write(project / "pyproject.toml", '[tool.modelcheck]\nextend-rules = ["health/*.toml"]\n')
    (project / "sub").mkdir()
    monkeypatch.chdir(project / "sub")
    report = modelcheck.check(dead_relu_model(), settings=config.load().settings)
    wide = [f for f in report.findings if f.rule == "wide-layers"]
    assert {f.layer for f in wide} == {"0", "1", "2", "3"}  # 32 units each, limit 16
    assert wide[0].code == "XT900" and wide[0].fixes[0].startswith("Use fewer units in")


def test_probe_file_named_in_the_config_is_relative_to_it(project, monkeypatch, capsys):
    torch.save(torch.randn(40, 8, generator=torch.Generator().manual_seed(0)), project / "x.pt")
    write(project / "pyproject.toml", '[tool.modelcheck]\nprobe = "x.pt"\n')
    (project / "sub").mkdir()
    monkeypatch.chdir(project / "sub")
    code, out, _ = run(["../dead.pt", "--trust", "--format", "json"], capsys)
    assert code == 1
    assert '"samples": 40' in out


def test_show_settings_is_valid_toml_holding_every_setting(project, capsys):
    write(
        project / "pyproject.toml",
        """
        [tool.modelcheck]
        select = ["MC1", "MC2"]
        per-layer-ignores = { "head.*" = ["saturation"] }

        [tool.modelcheck.rules.dead-units]
        error = 0.6
        """,
    )
    code, out, _ = run(["--show-settings"], capsys)
    shown = tomllib.loads(out)["tool"]["modelcheck"]
    assert code == 0
    assert shown["select"] == ["MC1", "MC2"]
    assert shown["per-layer-ignores"] == {"head.*": ["saturation"]}
    assert shown["rules"] == {"dead-units": {"error": 0.6}}
    assert Settings().updated(shown, "shown") == config.load().settings
    assert "pyproject.toml:5" in next(line for line in out.splitlines() if line.startswith("rules"))


# -- every mistake: one line, file, line and key ----------------------------------------------

BAD_CONFIGS = {
    "unknown-key": ('[tool.modelcheck]\nfail-on = "error"\nselct = ["MC1"]\n', 3, "'selct'"),
    "bad-value": ('[tool.modelcheck]\n\nfail-on = "fatal"\n', 3, "fail-on"),
    "unknown-rule-in-select": (
        '[tool.modelcheck]\nselect = ["dead-unitz"]\n',
        2,
        "'dead-unitz'; did you mean 'dead-units'",
    ),
    "unknown-rule-table": (
        "[tool.modelcheck]\nseed = 1\n\n[tool.modelcheck.rules.saturaton]\nerror = 0.6\n",
        4,
        "'saturaton'",
    ),
    "unknown-threshold-key": (
        "[tool.modelcheck.rules.dead-units]\nwarning = 0.3\neror = 0.6\n",
        3,
        "'eror'",
    ),
    "rule-prefix-as-table": ("[tool.modelcheck.rules]\nMC1 = { error = 0.6 }\n", 2, "'MC1'"),
    "unknown-rule-per-layer": (
        '[tool.modelcheck]\nper-layer-ignores = { "head.*" = ["saturatio"] }\n',
        2,
        "'saturatio'",
    ),
    "threshold-not-a-number": (
        '[tool.modelcheck]\nrules = { dead-units = { error = "high" } }\n',
        2,
        "dead-units.error",
    ),
    "extend-rules-matches-nothing": (
        '[tool.modelcheck]\nextend-rules = ["health/*.toml"]\n',
        2,
        "'health/*.toml'",
    ),
    "invalid-toml": ('[tool.modelcheck]\nselect = ["MC1",\nfail-on = "error"\n', 3, "TOML"),
}


@pytest.mark.parametrize("name", BAD_CONFIGS)
def test_a_bad_config_is_one_line_naming_file_line_and_key(project, capsys, name):
    text, line, key = BAD_CONFIGS[name]
    (project / "pyproject.toml").write_text(text)
    code, out, err = run(["dead.pt", "--trust"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and out == ""
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"modelcheck: error: pyproject.toml:{line}: "), lines[0]
    assert key in lines[0]


def test_missing_config_file_and_pyproject_without_the_table_are_errors(project, capsys):
    code, _, err = run(["dead.pt", "--config", "nope.toml"], capsys)
    assert code == 2 and err.strip() == "modelcheck: error: --config nope.toml: no such file"
    write(project / "other" / "pyproject.toml", '[project]\nname = "x"\n')
    code, _, err = run(["dead.pt", "--config", "other/pyproject.toml"], capsys)
    assert code == 2 and "other/pyproject.toml: no [tool.modelcheck] table" in err


def test_a_broken_team_rule_file_names_that_file(project):
    write(
        project / "health" / "bad.toml",
        WIDE_LAYERS_RULE.replace('value = "units"', 'value = "unitz"'),
    )
    write(project / "pyproject.toml", '[tool.modelcheck]\nextend-rules = ["health/*.toml"]\n')
    with pytest.raises(RuleError, match=r"bad\.toml.*unitz"):
        config.load()


# -- where keys are -------------------------------------------------------------------------

TOML = """\
[project]
name = "x"

[tool.modelcheck]
select = ["MC1",
  "MC2"]
"per-layer-ignores" = { "head.*" = ["saturation"], 'x.y' = [] }
rules.dead-units.error = 0.6
notes = \"\"\"
[not.a.header]
eror = 1
\"\"\"

[tool.modelcheck.rules.saturation]
warning = 0.3
eror = 1

[tool.modelcheck.rules]
vanishing = { eror = 2 }
"""


@pytest.mark.parametrize(
    ("keys", "line"),
    [
        (("tool", "modelcheck"), 4),
        (("tool", "modelcheck", "select"), 5),
        (("tool", "modelcheck", "per-layer-ignores", "head.*"), 7),
        (("tool", "modelcheck", "per-layer-ignores", "x.y"), 7),
        (("tool", "modelcheck", "rules", "dead-units", "error"), 8),
        (("tool", "modelcheck", "rules"), 8),
        (("tool", "modelcheck", "rules", "saturation", "eror"), 16),
        (("tool", "modelcheck", "rules", "vanishing", "eror"), 19),
        (("tool", "other"), None),
    ],
)
def test_key_line_finds_headers_dotted_keys_and_inline_tables(keys, line):
    assert config.key_line(TOML, keys) == line


def test_settings_from_the_api_reject_unknown_keys_with_a_suggestion():
    with pytest.raises(ConfigError, match="unknown setting 'fail_onn'; did you mean 'fail-on'"):
        modelcheck.check(dead_relu_model(), fail_onn="warning")
