"""What modelcheck promises a user who runs it on downloaded files in CI (see SECURITY.md).

A file never runs code unless the user passes --trust for the model file, and the --arch
module is the only user code imported, only when named. Rule files are data. Output cannot
be forged by strings from a model file, and nothing goes to the network.
"""

from __future__ import annotations

import html
import importlib
import io
import json
import os
import pickle
import socket
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import modelcheck
from modelcheck import rules
from modelcheck.cli import main
from modelcheck.errors import RuleError
from modelcheck.probe import probe_from_spec
from modelcheck.source import load_model


@pytest.fixture(autouse=True)
def _global_rng_left_alone():
    """Models built here draw from torch's global generator; later tests must not notice."""
    with torch.random.fork_rng():
        yield


ARCH = "security_arch"
ARCH_MODULE = """
from torch import nn


def make_mlp():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def make_linear():
    return nn.Linear(8, 4)


def make_markup_class():
    # A class name, like a module name, is the model author's to choose.
    cls = type("<img src=x onerror=alert(1)>", (nn.Sequential,), {})
    return cls(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def make_forged_names():
    # Module names come from the model: here, ones that try to forge output lines.
    model = nn.Sequential()
    model.add_module("fc", nn.Linear(8, 16))
    model.add_module("relu\\n::error file=app::forged\\x1b[2J", nn.ReLU())
    model.add_module("head", nn.Linear(16, 4))
    model.fc.weight.data.zero_()
    model.fc.bias.data.fill_(-1.0)  # every ReLU unit dead: the forged name is in a finding
    return model
"""


class MakesMarker:
    """A pickle payload that creates a marker directory when it is unpickled."""

    def __init__(self, marker: Path, via_exec: bool = False) -> None:
        self.marker, self.via_exec = marker, via_exec

    def __reduce__(self):
        if self.via_exec:
            return exec, (f"import os; os.mkdir({str(self.marker)!r})",)
        return os.mkdir, (str(self.marker),)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / f"{ARCH}.py").write_text(ARCH_MODULE)
    yield tmp_path
    for name in (ARCH, "evil_plugin"):
        sys.modules.pop(name, None)


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# -- hostile model files ---------------------------------------------------------------------


def _zip(obj, path: Path) -> None:
    torch.save(obj, path)


def _legacy(obj, path: Path) -> None:
    torch.save(obj, path, _use_new_zipfile_serialization=False)


def _pickle(protocol: int):
    def write(obj, path: Path) -> None:
        path.write_bytes(pickle.dumps(obj, protocol=protocol))

    return write


WRITERS = {
    "torch.save": _zip,
    "torch.save-legacy": _legacy,
    "pickle-2": _pickle(2),
    "pickle-4": _pickle(4),
    "pickle-5": _pickle(5),
}


@pytest.mark.parametrize("via_exec", [False, True], ids=["os.mkdir", "builtins.exec"])
@pytest.mark.parametrize("writer", WRITERS)
def test_malicious_model_file_is_refused_without_running_and_trust_lifts_the_refusal(
    workdir, capsys, writer, via_exec
):
    marker = workdir / "pwned"
    WRITERS[writer]({"model": nn.Linear(8, 4), "extra": MakesMarker(marker, via_exec)},
                    workdir / "evil.pt")  # fmt: skip

    code, out, err = run(["evil.pt", "-o", "report.json"], capsys)
    line = one_line(err)
    assert code == 2 and out == ""
    assert ("exec" if via_exec else "mkdir") in line  # which global it wanted
    assert "arbitrary code" in line and "--trust" in line  # and how to allow it
    assert not marker.exists()
    assert not (workdir / "report.json").exists()

    code, _, err = run(["evil.pt", "--trust", "--input-shape", "8"], capsys)
    assert marker.exists()  # trusting a file means running it: that is what --trust says
    assert code in (0, 1), err


@pytest.mark.parametrize("writer", ["torch.save", "pickle-4"])
def test_payload_inside_a_state_dict_is_refused_before_the_arch_is_built(workdir, capsys, writer):
    marker = workdir / "pwned"
    state = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).state_dict()
    state["0.weight"] = MakesMarker(marker)
    WRITERS[writer](state, workdir / "evil.pt")
    code, _, err = run(["evil.pt", "--arch", f"{ARCH}:make_mlp"], capsys)
    assert code == 2 and "mkdir" in one_line(err)
    assert not marker.exists()


def test_a_pickled_class_from_a_module_in_the_working_directory_is_never_imported(workdir, capsys):
    """The weights-only unpickler refuses the global before importing its module."""
    plugin = types.ModuleType("evil_plugin")
    exec("class Thing:\n    pass\n", plugin.__dict__)
    plugin.Thing.__module__ = "evil_plugin"
    sys.modules["evil_plugin"] = plugin
    torch.save({"model": plugin.Thing()}, workdir / "zip.pt")
    (workdir / "plain.pt").write_bytes(pickle.dumps({"model": plugin.Thing()}, protocol=4))
    del sys.modules["evil_plugin"]
    marker = workdir / "imported"
    (workdir / "evil_plugin.py").write_text(
        f"import os\nos.mkdir({str(marker)!r})\nclass Thing:\n    pass\n"
    )
    for name in ("zip.pt", "plain.pt"):
        code, _, err = run([name], capsys)
        assert code == 2 and "evil_plugin.Thing" in one_line(err)
        assert not marker.exists() and "evil_plugin" not in sys.modules


def test_the_arch_module_is_imported_only_when_named(workdir, capsys):
    marker = workdir / "imported"
    (workdir / "team_models.py").write_text(
        f"import os\nos.mkdir({str(marker)!r})\nfrom torch import nn\n"
        "def make():\n    return nn.Linear(8, 4)\n"
    )
    torch.save(nn.Linear(8, 4).state_dict(), workdir / "linear.pt")
    code, _, err = run(["linear.pt"], capsys)
    assert code == 2 and "--arch" in one_line(err)
    assert not marker.exists()
    code, _, err = run(["linear.pt", "--arch", "team_models:make"], capsys)
    assert code == 0, err
    assert marker.exists()
    sys.modules.pop("team_models", None)


def _exported(workdir: Path) -> Path:
    program = torch.export.export(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), (torch.ones(2, 4),))
    torch.export.save(program, workdir / "clean.pt2")
    return workdir / "clean.pt2"


def _rewritten(source: Path, target: Path, records: dict[str, bytes]) -> None:
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            inner = info.filename.split("/", 1)[1]
            new.writestr(info.filename, records.get(inner, old.read(info.filename)))


def _torch_saved(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("record", ["example-inputs", "pickled-weight"])
def test_torch_export_archive_that_would_unpickle_code_is_refused(workdir, capsys, record):
    """torch.export.load unpickles pickled weights with weights_only=False, and falls back
    to it when the example inputs fail a weights-only load."""
    clean, marker = _exported(workdir), workdir / "pwned"
    payload = _torch_saved(MakesMarker(marker))
    if record == "example-inputs":
        records = {"data/sample_inputs/model.pt": payload}
    else:
        with zipfile.ZipFile(clean) as archive:
            config_name = next(n for n in archive.namelist() if n.endswith("weights_config.json"))
            config = json.loads(archive.read(config_name))
        entry = next(iter(config["config"].values()))
        entry["use_pickle"] = True
        records = {
            "data/weights/model_weights_config.json": json.dumps(config).encode(),
            f"data/weights/{entry['path_name']}": payload,
        }
    _rewritten(clean, workdir / "evil.pt2", records)

    code, _, err = run(["evil.pt2", "--input-shape", "4"], capsys)
    line = one_line(err)
    assert code == 2 and "mkdir" in line and "--trust" in line
    assert not marker.exists()
    code, _, err = run(["evil.pt2", "--input-shape", "4", "--trust"], capsys)
    assert marker.exists()  # the refusal is ours: torch itself would have run it
    assert len(err.splitlines()) == 1  # torch's fallback logging stays quiet


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("record", ["data.pkl", "constants.pkl"])
def test_torchscript_archive_with_a_pickled_payload_never_runs_it(workdir, capsys, record):
    """torch.jit.load's unpickler resolves TorchScript types only: the payload is refused."""
    torch.jit.script(nn.Sequential(nn.Linear(4, 4), nn.ReLU())).save(workdir / "clean.jit")
    marker = workdir / "pwned"
    payload = pickle.dumps(MakesMarker(marker), protocol=2)
    _rewritten(workdir / "clean.jit", workdir / "evil.jit", {record: payload})
    for trust in ([], ["--trust"]):
        code, _, err = run(["evil.jit", "--input-shape", "4", *trust], capsys)
        assert code == 2 and "evil.jit" in one_line(err)
        assert not marker.exists()


def test_clean_torch_export_archive_loads_without_trust(workdir):
    loaded = load_model(_exported(workdir))
    assert loaded.format == "torch-export"


@pytest.mark.parametrize("role", ["model", "probe"])
def test_archive_that_would_decompress_to_far_more_than_its_size_is_refused(workdir, capsys, role):
    with zipfile.ZipFile(workdir / "bomb.pt", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("bomb/data.pkl", pickle.dumps({}, protocol=2))
        archive.writestr("bomb/data/0", bytes(64 * 2**20))  # 64 MiB of zeros
    assert (workdir / "bomb.pt").stat().st_size < 2**20
    torch.save(nn.Linear(8, 4).state_dict(), workdir / "linear.pt")
    model, probe = ("bomb.pt", "random") if role == "model" else ("linear.pt", "bomb.pt")
    code, _, err = run([model, "--arch", f"{ARCH}:make_linear", "--probe", probe], capsys)
    assert code == 2 and "bomb.pt" in err and "refusing to decompress" in one_line(err)


# -- hostile probe files: never unpickled, --trust or not -------------------------------------


def _probe_pt(marker: Path, path: Path) -> None:
    torch.save({"x": torch.zeros(4, 8), "y": MakesMarker(marker)}, path)


def _probe_npy(marker: Path, path: Path) -> None:
    np.save(path, np.array([MakesMarker(marker)] * 4, dtype=object), allow_pickle=True)


def _probe_npz(marker: Path, path: Path) -> None:
    np.savez(path, x=np.array([MakesMarker(marker)] * 4, dtype=object))


@pytest.mark.parametrize(
    ("suffix", "write"),
    [(".pt", _probe_pt), (".npy", _probe_npy), (".npz", _probe_npz)],
    ids=["pt", "npy", "npz"],
)
@pytest.mark.parametrize("trust", [False, True], ids=["untrusted", "trusted-model"])
def test_malicious_probe_file_is_refused_even_with_trust(workdir, capsys, suffix, write, trust):
    marker = workdir / "pwned"
    write(marker, workdir / f"probe{suffix}")
    torch.save(nn.Linear(8, 4).state_dict(), workdir / "linear.pt")
    argv = ["linear.pt", "--arch", f"{ARCH}:make_linear", "--probe", f"probe{suffix}"]
    argv += ["--trust"] if trust else []
    code, out, err = run(argv, capsys)
    line = one_line(err)
    assert code == 2 and out == ""
    assert f"probe{suffix}" in line
    assert not marker.exists()


# -- rule files are data ---------------------------------------------------------------------

RULE = """
code = "XX901"
slug = "hostile"
title = "A hostile rule"
what = "w"
why = "w"
scope = "layer"
value = "units"
condition = {condition!r}
message = {message!r}
[thresholds]
warning = 10
"""


@pytest.mark.parametrize(
    ("condition", "message", "needle"),
    [
        ("__import__('os').mkdir('pwned') or value > threshold", "m", "method calls"),
        ("__import__('os') or value > threshold", "m", "names starting with '_'"),
        ("().__class__.__bases__[0].__subclasses__()", "m", "method calls"),
        ("().__class__", "m", "attribute access"),
        ("exec('import os') or value > threshold", "m", "function 'exec' is not allowed"),
        ("[open('pwned', 'w') for _ in (1,)]", "m", "comprehensions"),
        ("(lambda: 1)() > threshold", "m", "lambda"),
        ("value > threshold", "{value.__class__.__init__.__globals__}", "unknown field"),
        ("value > threshold", "{units[0]}", "unknown field"),
    ],
    ids=["import-call", "import", "subclasses", "attribute", "exec", "comprehension", "lambda",
         "format-attribute", "format-index"],
)  # fmt: skip
def test_rule_file_that_reaches_for_code_is_refused_at_load(workdir, condition, message, needle):
    path = workdir / "hostile.toml"
    path.write_text(RULE.format(condition=condition, message=message))
    with pytest.raises(RuleError) as caught:
        modelcheck.check(nn.Linear(8, 4), torch.randn(4, 8), extend_rules=[str(path)])
    text = str(caught.value)
    assert "\n" not in text and str(path) in text and needle in text, text
    assert not (workdir / "pwned").exists()


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (("value > threshold", "value > treshold"), ":9: condition: unknown name 'treshold'"),
        (('scope = "layer"', 'scope = "galaxy"'), ":7: scope 'galaxy' must be one of"),
        (('why = "w"', 'whyy = "w"'), ":6: unknown key 'whyy'"),
        (("warning = 10", "warning = ten"), ":12: invalid TOML: Invalid value"),
    ],
    ids=["condition", "value", "unknown-key", "toml-syntax"],
)
def test_rule_file_errors_name_the_file_the_line_and_the_key(tmp_path, edit, expected):
    path = tmp_path / "team.toml"
    path.write_text(RULE.format(condition="value > threshold", message="m").replace(*edit))
    with pytest.raises(RuleError) as caught:
        rules.load_rule_file(path)
    assert str(caught.value).startswith(f"{path}{expected}"), str(caught.value)


# -- output cannot be forged -----------------------------------------------------------------

FORGED_KEY = "0.weight\n::error file=app::forged\x1b[2J\u202e"


def test_error_line_escapes_control_characters_from_the_file(workdir, capsys):
    state = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).state_dict()
    state[FORGED_KEY] = torch.zeros(1)
    torch.save(state, workdir / "forged.pt")
    code, out, err = run(["forged.pt", "--arch", f"{ARCH}:make_mlp"], capsys)
    line = one_line(err)
    assert code == 2 and out == ""
    assert "0.weight\\n::error file=app::forged\\x1b[2J\\u202e" in line
    assert line.isprintable()


def test_text_report_escapes_module_names_and_json_keeps_them_exact(workdir, capsys):
    sys.path.insert(0, str(workdir))
    try:
        arch = importlib.import_module(ARCH)
    finally:
        sys.path.remove(str(workdir))
    torch.save(arch.make_forged_names().state_dict(), workdir / "forged.pt")
    args = ["forged.pt", "--arch", f"{ARCH}:make_forged_names", "--input-shape", "8"]
    code, out, _ = run(args, capsys)
    assert code == 1
    assert "relu\\n::error file=app::forged\\x1b[2J" in out
    assert all(line.isprintable() for line in out.splitlines())
    assert not any(line.startswith("::") for line in out.splitlines())
    code, out, _ = run([*args, "--format", "json"], capsys)
    assert "\x1b" not in out and "\n::" not in out
    names = {layer["name"] for layer in json.loads(out)["layers"]}
    assert "relu\n::error file=app::forged\x1b[2J" in names


def test_html_report_shows_class_file_and_module_names_as_text(workdir, capsys):
    model_file, probe_file = "<svg onload=alert(1)>.pt", "<b>probe.npy"
    torch.save(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).state_dict(),
               workdir / model_file)  # fmt: skip
    np.save(workdir / probe_file, np.ones((8, 8), np.float32))
    code, _, err = run(
        [model_file, "--arch", f"{ARCH}:make_markup_class", "--probe", probe_file,
         "--html", "report.html"],
        capsys,
    )  # fmt: skip
    assert code in (0, 1), err
    page = (workdir / "report.html").read_text()
    for markup in ("<img src=x onerror=alert(1)>", "<svg onload=alert(1)>", "<b>probe"):
        assert markup not in page
        assert html.escape(markup, quote=False) in page or html.escape(markup) in page
    assert "<img" not in page and "<svg onload" not in page


# -- nothing goes to the network ----------------------------------------------------------------


def test_a_check_opens_no_network_connection(workdir, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("modelcheck tried to use the network")

    for name in ("create_connection", "getaddrinfo"):
        monkeypatch.setattr(socket, name, refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    torch.save(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), workdir / "iris.pt")
    code, out, err = run(["iris.pt", "--trust", "--probe", "iris"], capsys)
    assert code in (0, 1), err
    assert "150 samples" in out


def test_model_and_probe_files_are_loaded_weights_only_unless_the_model_is_trusted(
    workdir, monkeypatch
):
    seen = []
    real_load = torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    torch.save(nn.Linear(8, 4).state_dict(), workdir / "sd.pt")
    torch.save(nn.Linear(8, 4), workdir / "whole.pt")
    torch.save({"x": torch.zeros(3, 8)}, workdir / "probe.pt")
    load_model(workdir / "sd.pt", arch=f"{ARCH}:make_linear")
    probe_from_spec(str(workdir / "probe.pt"))
    assert seen == [True, True]
    load_model(workdir / "whole.pt", trust=True)
    assert seen == [True, True, False]
