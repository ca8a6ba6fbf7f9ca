"""The command line: exit codes, one-line errors, output formats, rule documentation."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from models import dead_relu_model, mlp, seeded

from modelcheck.cli import main
from modelcheck.demo import IrisFFNN

ARCH_MODULE = """
import torch
from torch import nn

def make_mlp(width=16):
    return nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 4))

def make_dead():
    model = make_mlp(32)
    with torch.no_grad():
        model[0].bias[:24] = -100.0
    return model
"""


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working directory holding an importable architecture module and checkpoints."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "netdefs.py").write_text(ARCH_MODULE)
    healthy = seeded(0)(lambda: mlp([8, 16, 4]))()
    torch.save(healthy.state_dict(), tmp_path / "healthy.pt")
    sys.path.insert(0, str(tmp_path))
    import netdefs

    torch.save(seeded(0)(netdefs.make_dead)().state_dict(), tmp_path / "dead.pt")
    sys.path.remove(str(tmp_path))
    yield tmp_path
    sys.modules.pop("netdefs", None)


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("modelcheck: error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_healthy_model_exits_zero_with_a_summary_line(workdir, capsys):
    code, out, _ = run(["healthy.pt", "--arch", "netdefs:make_mlp"], capsys)
    assert code == 0, out
    assert out.strip().splitlines()[-1].startswith(("All checks passed", "Found 0 errors"))


def test_findings_at_fail_on_exit_one_and_print_one_line_each(workdir, capsys):
    code, out, _ = run(
        ["dead.pt", "--arch", "netdefs:make_mlp", "--arch-kwargs", '{"width": 32}'], capsys
    )
    assert code == 1
    line = next(line for line in out.splitlines() if "MC101" in line)
    assert line.split()[:4] == ["1", "MC101", "dead-units", "error"]
    assert "0.75 vs 0.5" in line


def test_fail_on_never_and_exit_zero_turn_findings_into_success(workdir, capsys):
    args = ["dead.pt", "--arch", "netdefs:make_dead"]
    assert run([*args, "--fail-on", "never"], capsys)[0] == 0
    assert run([*args, "--exit-zero"], capsys)[0] == 0


def test_ignore_by_slug_and_select_by_code_prefix(workdir, capsys):
    args = ["dead.pt", "--arch", "netdefs:make_dead"]
    code, out, _ = run([*args, "--ignore", "dead-units"], capsys)
    assert "MC101" not in out
    code, out, _ = run([*args, "--select", "MC2"], capsys)
    assert "MC101" not in out and code == 0


def test_json_output_has_the_contract_keys(workdir, capsys):
    code, out, _ = run(
        [
            "dead.pt",
            "--arch",
            "netdefs:make_dead",
            "--format",
            "json",
            "--probe",
            "random",
            "--max-samples",
            "100",
        ],
        capsys,
    )
    data = json.loads(out)
    assert {"version", "model", "probe", "layers", "findings", "summary"} <= data.keys()
    assert {"source", "parameters"} <= data["model"].keys()
    assert data["probe"]["samples"] == 100
    stats_keys = {
        "count",
        "mean",
        "std",
        "rms",
        "min",
        "max",
        "skewness",
        "kurtosis",
        "zero_fraction",
        "nonfinite",
        "units",
        "dead_fraction",
        "saturated_fraction",
        "grad_rms",
    }
    for layer in data["layers"]:
        assert {"name", "type", "stats"} <= layer.keys()
        assert stats_keys <= layer["stats"].keys()
    finding = data["findings"][0]
    assert {
        "code",
        "rule",
        "severity",
        "layer",
        "value",
        "threshold",
        "message",
        "fixes",
    } <= finding.keys()
    assert data["summary"]["errors"] == 1 and code == 1


def test_output_file_is_written_and_never_over_the_model(workdir, capsys):
    code, _, _ = run(
        ["healthy.pt", "--arch", "netdefs:make_mlp", "-o", "out.json", "--format", "json"], capsys
    )
    assert json.loads((workdir / "out.json").read_text())["summary"]["ok"] is True
    before = (workdir / "healthy.pt").read_bytes()
    code, _, err = run(["healthy.pt", "--arch", "netdefs:make_mlp", "-o", "healthy.pt"], capsys)
    assert_one_line_error(code, err, "would overwrite")
    assert (workdir / "healthy.pt").read_bytes() == before


def test_probe_dataset_with_labels_uses_the_real_loss(workdir, capsys):
    torch.save(IrisFFNN().state_dict(), workdir / "iris.pt")
    (workdir / "irisnet.py").write_text("from modelcheck.demo import IrisFFNN\n")
    _, out, _ = run(
        ["iris.pt", "--arch", "irisnet:IrisFFNN", "--probe", "iris", "--format", "json"], capsys
    )
    data = json.loads(out)
    assert data["probe"]["loss"] == "cross_entropy"
    assert data["probe"]["samples"] == 150
    sys.modules.pop("irisnet", None)


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["missing.pt"], ["missing.pt", "does not exist"]),
        (["corrupt.pt"], ["corrupt.pt"]),
        (["healthy.pt", "--arch", "netdefs:nope"], ["netdefs:nope", "no attribute"]),
        (["healthy.pt", "--arch", "nosuchmodule:make"], ["nosuchmodule"]),
        (
            ["healthy.pt", "--arch", "netdefs:make_mlp", "--probe", "wrong.npy"],
            ["layer 0", "in_features=8", "(64, 5)"],
        ),
        (["healthy.pt"], ["state_dict", "--arch"]),
        (
            ["healthy.pt", "--arch", "netdefs:make_mlp", "--select", "no-such-rule"],
            ["no-such-rule"],
        ),
        (["healthy.pt", "--arch", "netdefs:make_mlp", "--batch-size", "0"], ["batch"]),
        (["healthy.pt", "--no-such-flag"], ["--no-such-flag"]),
    ],
    ids=[
        "missing",
        "corrupt",
        "bad-arch-attr",
        "bad-arch-module",
        "probe-shape",
        "state-dict-needs-arch",
        "unknown-rule",
        "bad-batch-size",
        "unknown-flag",
    ],
)
def test_bad_input_exits_two_with_one_line(workdir, capsys, argv, needles):
    (workdir / "corrupt.pt").write_bytes(b"PK\x03\x04 this is not a zip archive at all")
    import numpy as np

    np.save(workdir / "wrong.npy", np.zeros((64, 5), dtype=np.float32))
    code, out, err = run(argv, capsys)
    assert_one_line_error(code, err, *needles)
    assert out == ""


def test_debug_shows_the_traceback(workdir, capsys):
    code, _, err = run(["missing.pt", "--debug"], capsys)
    assert code == 2 and "Traceback" in err


def test_rules_lists_every_core_rule(capsys):
    code, out, _ = run(["rules"], capsys)
    slugs = [
        "dead-units",
        "saturation",
        "exploding-activations",
        "vanishing-activations",
        "kurtosis-growth",
        "vanishing-gradients",
        "exploding-gradients",
        "nonfinite",
        "poor-initialization",
        "unscaled-input",
        "collapsed-output",
    ]
    assert code == 0
    for slug in slugs:
        assert slug in out
    kurtosis = next(line for line in out.splitlines() if "kurtosis-growth" in line)
    assert kurtosis.endswith("[warning 50, info]")  # info whenever it grows: no -inf


def test_metrics_lists_every_name_a_rule_can_use(capsys):
    from modelcheck.expr import FUNCTIONS
    from modelcheck.metrics import LAYER_METRICS, MODEL_METRICS, PARAMETER_METRICS

    code, out, _ = run(["metrics"], capsys)
    assert code == 0
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("  ")}
    every = {*MODEL_METRICS, *LAYER_METRICS, *PARAMETER_METRICS, *FUNCTIONS, "value", "also"}
    assert every <= listed
    code, out, _ = run(["metrics", "--format", "json"], capsys)
    names = json.loads(out)
    assert names["layer"] == dict(LAYER_METRICS) and names["functions"] == dict(FUNCTIONS)


TEAM_RULE = """
code = "TM900"
slug = "team-rule"
title = "A rule of the team's"
what = "Finds wide layers."
why = "Because."
scope = "layer"
value = "units"
condition = "value > threshold"
message = "{units} units"
[thresholds]
warning = 10
"""


@pytest.mark.parametrize("how", ["nearest-pyproject", "--config"])
def test_rules_and_rule_show_the_projects_own_rules(tmp_path, monkeypatch, capsys, how):
    (tmp_path / "health").mkdir()
    (tmp_path / "health" / "team.toml").write_text(TEAM_RULE)
    (tmp_path / "pyproject.toml").write_text(
        '[tool.modelcheck]\nextend-rules = ["health/*.toml"]\n'
        "[tool.modelcheck.rules.team-rule]\nwarning = 20\n"
    )
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub" if how == "nearest-pyproject" else "/")
    extra = [] if how == "nearest-pyproject" else ["--config", str(tmp_path / "pyproject.toml")]
    code, out, _ = run(["rules", *extra], capsys)
    assert code == 0 and out.splitlines()[-1].endswith("A rule of the team's  [warning 20]")
    code, out, _ = run(["rule", "TM900", *extra], capsys)
    assert code == 0 and out.startswith("TM900 team-rule — A rule of the team's")


@pytest.mark.parametrize("name", ["MC101", "dead-units"])
def test_rule_explains_what_why_and_how_to_fix(capsys, name):
    code, out, _ = run(["rule", name], capsys)
    assert code == 0
    for heading in ("What it does", "Why it matters", "How to fix", "References"):
        assert heading in out
    assert out.startswith("MC101 dead-units")


def test_unknown_rule_suggests_a_close_one(capsys):
    code, _, err = run(["rule", "dead-unit"], capsys)
    assert_one_line_error(code, err, "dead-unit", "dead-units")


@pytest.mark.parametrize(
    ("argv", "exit_code"),
    [
        (["rule", "MC101"], 0),
        (["rules"], 0),
        (["rules", "--format", "json"], 0),
        (["metrics"], 0),
        (["--show-settings"], 0),
        (["--help"], 0),
        (["--version"], 0),
        (["--bogus"], 2),
        (["rule", "nothing-like-it"], 2),
        (["missing.pt"], 2),
        (["."], 2),
    ],
)
def test_commands_that_run_no_model_do_not_import_torch(tmp_path, argv, exit_code):
    """Importing torch takes seconds: explaining a rule or a flag must not wait for it."""
    script = (
        "import sys\n"
        "from modelcheck.cli import main\n"
        "try:\n"
        f"    code = main({argv!r})\n"
        "except SystemExit as stop:\n"
        "    code = stop.code\n"
        "print('torch' in sys.modules, code, file=sys.stderr)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path
    )
    imported, code = result.stderr.strip().splitlines()[-1].split()
    assert imported == "False", result.stderr
    assert code == str(exit_code)


def test_demo_prints_per_layer_findings_for_the_seed_network(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(["demo"], capsys)
    assert code in (0, 1)
    assert "Iris" in out
    assert "fc3.relu  MC101 dead-units" in out
    assert "fix:" in out
    assert f"HTML report: {tmp_path / 'modelcheck-demo.html'}" in out
    assert "fc3.relu" in (tmp_path / "modelcheck-demo.html").read_text()


def test_console_script_runs_as_a_separate_process(tmp_path):
    model = dead_relu_model(0.75)
    torch.save(model, tmp_path / "whole.pt")
    result = subprocess.run(
        [sys.executable, "-m", "modelcheck.cli", str(tmp_path / "whole.pt")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 2
    assert "--trust" in result.stderr and "Traceback" not in result.stderr
    trusted = subprocess.run(
        [sys.executable, "-m", "modelcheck.cli", str(tmp_path / "whole.pt"), "--trust"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert trusted.returncode == 1, trusted.stderr
    assert "MC101 dead-units" in trusted.stdout
