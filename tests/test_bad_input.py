"""The bad-input matrix: everything a user can hand the command line that stops a check.

Each row runs ``modelcheck`` with ``-o report.json --html report.html`` and asserts exit
code 2, one line on stderr that names the problem, no traceback, nothing on stdout and no
file written or left behind. Rows that are findings rather than errors (NaN in the probe)
and the runs that recover (out of memory on a big batch) are tested after the matrix.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from modelcheck.cli import main


@pytest.fixture(autouse=True)
def _global_rng_left_alone():
    """Models built here draw from torch's global generator; later tests must not notice."""
    with torch.random.fork_rng():
        yield


ARCH = "bad_input_arch"
ARCH_MODULE = '''
import os
import signal
import time

import torch
from torch import nn
from torch import nn


def make_mlp(width=16):
    return nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 4))


class Raises(nn.Module):
    """Fails in the middle of its forward, at the layer named 'head'."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
        self.head = Exploding()

    def forward(self, x):
        return self.head(self.body(x))


class Exploding(nn.Module):
    def forward(self, x):
        raise ValueError("the head cannot take negative inputs")


class Hungry(nn.Module):
    """Runs out of memory on batches of more than ``fits`` samples, the way CUDA says so."""

    def __init__(self, fits=0, cpu=False):
        super().__init__()
        self.fits, self.cpu = fits, cpu
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        if x.shape[0] > self.fits:
            if self.cpu:
                raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: "
                                   "can't allocate memory: you tried to allocate 6442450944 bytes")
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 6.00 GiB")
        return self.fc(x)


class Interrupted(nn.Module):
    """Signals its own process from inside the forward, as Ctrl-C or a CI cancel would."""

    def __init__(self, signum=2, started=""):
        super().__init__()
        self.signum, self.started = signum, started
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        if self.started:  # another process waits for this file, then sends the signal
            open(self.started, "w").close()
            time.sleep(60)
        else:
            os.kill(os.getpid(), self.signum)
        return self.fc(x)
'''


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A directory with an importable architecture module, checkpoints and probes."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / f"{ARCH}.py").write_text(ARCH_MODULE)
    monkeypatch.syspath_prepend(tmp_path)
    arch = importlib.import_module(ARCH)
    for name in ("make_mlp", "Raises", "Hungry", "Interrupted"):
        file = "model.pt" if name == "make_mlp" else f"{name.lower()}.pt"
        torch.save(getattr(arch, name)().state_dict(), tmp_path / file)
    torch.save({}, tmp_path / "empty_sd.pt")
    yield tmp_path
    sys.modules.pop(ARCH, None)


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def listing(directory: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``directory`` with its size and modification time."""
    return {
        str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in directory.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def assert_refused(code: int, out: str, err: str, *needles: str) -> None:
    assert code == 2, err
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("modelcheck: error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


# -- the files each row needs, written on demand --------------------------------------------


def _truncated(d: Path) -> str:
    data = (d / "model.pt").read_bytes()
    (d / "truncated.pt").write_bytes(data[: len(data) // 2])
    return "truncated.pt"


def _flip_a_tensor_byte(source: Path, target: Path) -> None:
    """One byte of a tensor record flipped: the archive still opens and unpickles."""
    data = bytearray(source.read_bytes())
    with zipfile.ZipFile(source) as archive:
        record = next(i for i in archive.infolist() if "/data/" in i.filename)
    # A local file header is 30 bytes, then the name and the extra field, then the data.
    offset = record.header_offset
    name_length, extra_length = struct.unpack("<HH", data[offset + 26 : offset + 30])
    data[offset + 30 + name_length + extra_length] ^= 0xFF
    target.write_bytes(bytes(data))
    torch.load(target, weights_only=True)  # torch itself does not notice


def _flipped_weights(d: Path) -> str:
    _flip_a_tensor_byte(d / "model.pt", d / "flipped.pt")
    return "flipped.pt"


def _flipped_probe(d: Path) -> str:
    torch.save(torch.ones(10, 8), d / "probe.pt")
    _flip_a_tensor_byte(d / "probe.pt", d / "flipped_probe.pt")
    return "flipped_probe.pt"


def _garbled_legacy(d: Path) -> str:
    """The pre-zip torch.save format, cut off in the middle of its pickles."""
    model = torch.nn.Linear(8, 4)
    torch.save(model.state_dict(), d / "legacy.pt", _use_new_zipfile_serialization=False)
    data = (d / "legacy.pt").read_bytes()
    (d / "legacy_cut.pt").write_bytes(data[: len(data) // 3])
    return "legacy_cut.pt"


def _cut_pickle(d: Path) -> str:
    data = pickle.dumps({"weights": list(range(100))}, protocol=4)
    (d / "cut.pkl").write_bytes(data[: len(data) // 2])
    return "cut.pkl"


def _png(d: Path) -> str:
    (d / "photo.pt").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    return "photo.pt"


def _text(d: Path) -> str:
    (d / "notes.pt").write_text("these are my notes, not a model\n")
    return "notes.pt"


def _random_bytes(d: Path) -> str:
    (d / "noise.pt").write_bytes(b"\x80" + np.random.default_rng(0).bytes(999))
    return "noise.pt"


def _state_dict_edit(name: str, edit) -> callable:
    def make(d: Path) -> str:
        state = torch.load(d / "model.pt", weights_only=True)
        edit(state)
        torch.save(state, d / name)
        return name

    return make


def _npy(name: str, array: np.ndarray) -> callable:
    def make(d: Path) -> str:
        np.save(d / name, array)
        return name

    return make


def _file(name: str, content: str) -> callable:
    def make(d: Path) -> str:
        (d / name).write_text(content)
        return name

    return make


def _labelled(d: Path) -> str:
    x = np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32)
    y = np.full(20, 7, dtype=np.int64)  # class 7 of a 4-class output
    np.savez(d / "labelled.npz", x=x, y=y)
    return "labelled.npz"


def _inputs_and_labels(d: Path) -> str:
    x = np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32)
    np.savez(d / "named.npz", inputs=x, labels=np.zeros(20, dtype=np.int64))
    return "named.npz"


def _batch_list(d: Path) -> str:
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(40, dtype=torch.long)
    torch.save([(x[:20], y[:20]), (x[20:], y[20:])], d / "batches.pt")
    return "batches.pt"


TEAM_RULE = """code = "XX901"
slug = "team-rule"
title = "Wide layers"
what = "w"
why = "w"
scope = "layer"
value = "units"
condition = "value > treshold"
message = "{units} units"
[thresholds]
warning = 10
"""


def _config_with_rule_file(content: str) -> callable:
    def make(d: Path) -> str:
        (d / "team.toml").write_text(content)
        (d / "modelcheck.toml").write_text('extend-rules = ["team.toml"]\n')
        return "modelcheck.toml"

    return make


def _mkdir(name: str) -> callable:
    def make(d: Path) -> str:
        (d / name).mkdir()
        return name

    return make


def _same(name: str) -> callable:
    return lambda d: name


def _nothing(d: Path) -> str:
    return ""


MLP = ["--arch", f"{ARCH}:make_mlp"]

# (id, make the file the row is about -> its name, argv using {f}, words the line must hold)
MATRIX = [
    ("missing-path", _same("nowhere.pt"), ["{f}"], ["nowhere.pt", "does not exist"]),
    ("directory", _mkdir("models"), ["{f}"], ["models", "is a directory"]),
    ("empty-file", _file("empty.pt", ""), ["{f}"], ["empty.pt", "is empty"]),
    ("truncated-archive", _truncated, ["{f}", *MLP], ["truncated.pt", "truncated"]),
    ("corrupted-archive", _flipped_weights, ["{f}", *MLP], ["flipped.pt", "checksum"]),
    ("corrupted-legacy-file", _garbled_legacy, ["{f}", *MLP], ["legacy_cut.pt", "corrupted"]),
    ("random-bytes", _random_bytes, ["{f}", *MLP], ["noise.pt", "not a valid pickle"]),
    ("cut-off-pickle", _cut_pickle, ["{f}"], ["cut.pkl", "not a valid pickle"]),
    ("an-image", _png, ["{f}"], ["photo.pt", "PNG image"]),
    ("a-text-file", _text, ["{f}"], ["notes.pt", "text file"]),
    (
        "state-dict-missing-key",
        _state_dict_edit("missing.pt", lambda s: s.pop("2.bias")),
        ["{f}", *MLP],
        ["missing.pt", "'2.bias'", "in the model but not in the file"],
    ),
    (
        "state-dict-unexpected-key",
        _state_dict_edit("extra.pt", lambda s: s.update(extra=torch.zeros(3))),
        ["{f}", *MLP],
        ["extra.pt", "'extra'", "in the file but not in the model"],
    ),
    (
        "state-dict-mis-shaped-key",
        _state_dict_edit("wide.pt", lambda s: s.update({"0.weight": torch.zeros(16, 9)})),
        ["{f}", *MLP],
        ["wide.pt", "'0.weight'", "(16, 9)", "(16, 8)"],
    ),
    ("empty-state-dict", _same("empty_sd.pt"), ["{f}", *MLP], ["empty_sd.pt"]),
    (
        "input-shape-with-a-letter",  # read as (4,) before: 'x' also separates, "4x4"
        _same("model.pt"),
        ["{f}", *MLP, "--input-shape", "4,x"],
        ["--input-shape '4,x'", "positive integers"],
    ),
    (
        "input-shape-with-an-empty-size",
        _same("model.pt"),
        ["{f}", *MLP, "--input-shape", "3,,32"],
        ["--input-shape '3,,32'", "positive integers"],
    ),
    (
        "probe-of-the-wrong-shape",
        _npy("p.npy", np.zeros((10, 5), np.float32)),
        ["model.pt", *MLP, "--probe", "{f}"],
        ["layer 0", "in_features=8", "(10, 5)"],
    ),
    (
        "probe-of-a-complex-dtype",
        _npy("p.npy", np.zeros((10, 8), np.complex64)),
        ["model.pt", *MLP, "--probe", "{f}"],
        ["p.npy", "real numbers", "complex64"],
    ),
    (
        "probe-of-strings",
        _npy("p.npy", np.array([["a"] * 8] * 10)),
        ["model.pt", *MLP, "--probe", "{f}"],
        ["p.npy", "real numbers"],
    ),
    (
        "probe-of-integers-for-a-float-layer",
        _npy("p.npy", np.zeros((10, 8), np.int64)),
        ["model.pt", *MLP, "--probe", "{f}"],
        ["layer 0", "dtype", "Long"],
    ),
    (
        "probe-of-pickled-objects",
        _npy("p.npy", np.array([{"x": 1}] * 4, dtype=object)),
        ["model.pt", *MLP, "--probe", "{f}"],
        ["p.npy", "dtype object"],
    ),
    (
        "corrupted-probe-archive",
        _flipped_probe,
        ["model.pt", *MLP, "--probe", "{f}"],
        ["flipped_probe.pt", "checksum"],
    ),
    (
        "empty-probe-array",
        _npy("p.npy", np.zeros((0, 8), np.float32)),
        ["model.pt", *MLP, "--probe", "{f}"],
        ["p.npy", "empty"],
    ),
    (
        "empty-probe-csv",
        _file("p.csv", "a,b,c,d,e,f,g,h\n"),
        ["model.pt", *MLP, "--probe", "{f}"],
        ["p.csv", "empty"],
    ),
    (
        "probe-csv-with-a-word",
        _file("p.csv", "1,2,3,4,5,6,7,8\n1,2,3,x,5,6,7,8\n"),
        ["model.pt", *MLP, "--probe", "{f}"],
        ["p.csv", "line 2", "'x' is not a number"],
    ),
    (
        "probe-csv-with-its-label-column-as-input",
        _file("p.csv", "a,b,c,d,e,f,g,h,y\n" + "1,2,3,4,5,6,7,8,0\n" * 3),
        ["model.pt", *MLP, "--probe", "{f}"],
        ["9 columns of p.csv went in as inputs", "model takes 8", "--target"],
    ),
    (
        "probe-arrays-named-other-than-x-and-y",
        _inputs_and_labels,
        ["model.pt", *MLP, "--probe", "{f}"],
        [
            "given input a dict of 'inputs', 'labels': ",
            "named.npz's arrays 'inputs', 'labels' went to the model as named inputs",
            "name them x and y",
        ],
    ),
    (
        "probe-file-of-batches",
        _batch_list,
        ["model.pt", *MLP, "--probe", "{f}"],
        ["batches.pt holds a list of 2 (inputs, labels) batches", "torch.save((x, y), path)"],
    ),
    (
        "probe-file-that-is-not-what-it-says",
        _file("p.npy", "x,y\n1,2\n"),
        ["model.pt", *MLP, "--probe", "{f}"],
        ["p.npy", "not a NumPy .npy file"],
    ),
    (
        "missing-probe-file",
        _same("nowhere.npy"),
        ["model.pt", *MLP, "--probe", "{f}"],
        ["nowhere.npy", "does not exist"],
    ),
    (
        "labels-beyond-the-classes",
        _labelled,
        ["model.pt", *MLP, "--probe", "{f}", "--loss", "cross_entropy"],
        ["labels do not fit", "(20, 4)", "out of bounds"],
    ),
    (
        "forward-that-raises",
        _nothing,
        ["raises.pt", "--arch", f"{ARCH}:Raises", "--input-shape", "8"],
        ["layer head", "Exploding", "negative inputs"],
    ),
    (
        "out-of-memory-even-one-sample-at-a-time",
        _nothing,
        ["hungry.pt", "--arch", f"{ARCH}:Hungry", "--input-shape", "8"],
        ["out of memory", "batch of 1 sample", "64, 32, 16, 8, 4, 2, 1"],
    ),
    (
        "bad-rule-file",
        _config_with_rule_file(TEAM_RULE),
        ["model.pt", *MLP, "--config", "{f}"],
        ["team.toml:8:", "condition", "unknown name 'treshold'", "did you mean 'threshold'"],
    ),
    (
        "rule-file-that-is-not-toml",
        _config_with_rule_file("these are my notes, not a rule\n"),
        ["model.pt", *MLP, "--config", "{f}"],
        ["team.toml:1:", "invalid TOML"],
    ),
    (
        "config-unknown-key",
        _file("cfg.toml", 'select = ["dead-units"]\nfial-on = "warning"\n'),
        ["model.pt", *MLP, "--config", "{f}"],
        ["cfg.toml:2:", "unknown setting 'fial-on'", "did you mean 'fail-on'"],
    ),
    (
        "config-bad-value",
        _file("cfg.toml", "[tool.modelcheck]\nbatch-size = 0\n"),
        ["model.pt", *MLP, "--config", "{f}"],
        ["cfg.toml:2:", "batch-size", "got 0"],
    ),
    (
        "config-unknown-rule-override",
        _file("cfg.toml", "[rules.dead-units]\neror = 0.6\n"),
        ["model.pt", *MLP, "--config", "{f}"],
        ["cfg.toml:2:", "rules.dead-units", "unknown key 'eror'"],
    ),
    (
        "config-toml-syntax",
        _file("cfg.toml", "fail-on = \n"),
        ["model.pt", *MLP, "--config", "{f}"],
        ["cfg.toml:1:", "invalid TOML"],
    ),
    (
        "missing-config-file",
        _same("nowhere.toml"),
        ["model.pt", *MLP, "--config", "{f}"],
        ["nowhere.toml", "no such file"],
    ),
    (
        "unknown-rule-in-select",
        _nothing,
        ["model.pt", *MLP, "--select", "dead-unit"],
        ["unknown rule 'dead-unit'", "did you mean 'dead-units'"],
    ),
    (
        "unknown-rule-code-in-ignore",
        _nothing,
        ["model.pt", *MLP, "--ignore", "MC999"],
        ["unknown rule 'MC999'"],
    ),
    (
        "arch-module-that-does-not-exist",
        _nothing,
        ["model.pt", "--arch", "no_such_module:make"],
        ["no_such_module", "cannot import"],
    ),
    (
        "arch-kwargs-that-are-not-json",
        _nothing,
        ["model.pt", *MLP, "--arch-kwargs", "{width: 3}"],
        ["--arch-kwargs", "not valid JSON"],
    ),
    ("negative-batch-size", _nothing, ["model.pt", *MLP, "--batch-size", "-4"], ["batch"]),
    ("unknown-flag", _nothing, ["model.pt", "--colour"], ["--colour"]),
]


@pytest.mark.parametrize(("make", "argv", "needles"), [row[1:] for row in MATRIX],
                         ids=[row[0] for row in MATRIX])  # fmt: skip
def test_bad_input_is_one_line_exit_two_and_writes_nothing(workdir, capsys, make, argv, needles):
    name = make(workdir)
    before = listing(workdir)
    args = [a.replace("{f}", name) for a in argv]
    code, out, err = run([*args, "-o", "report.json", "--html", "report.html"], capsys)
    assert_refused(code, out, err, *needles)
    assert listing(workdir) == before  # no report, no temporary file, nothing touched


def test_a_lazy_module_that_never_ran_is_one_line_exit_two(workdir, capsys):
    # The CLI asked its first layer for an input size and told to pass --input-shape;
    # with one, the check would have initialised the layer.
    torch.save(nn.Sequential(nn.LazyLinear(16), nn.ReLU(), nn.Linear(16, 3)), "lazy.pt")
    code, out, err = run(["lazy.pt", "--trust"], capsys)
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [
        "modelcheck: error: '0' (LazyLinear) is not initialised yet: a lazy module takes its "
        "shapes from its first call; run the model once on a batch (or load its trained "
        "weights) before checking it"
    ]


@pytest.mark.parametrize("make", [_random_bytes, _cut_pickle, _garbled_legacy])
def test_a_damaged_file_is_called_damaged_not_untrusted(workdir, capsys, make):
    """--trust cannot mend a broken file: the message must not send the user there."""
    code, _, err = run([make(workdir), *MLP], capsys)
    assert code == 2 and "corrupted" in err and "--trust" not in err


def test_debug_adds_the_traceback_and_keeps_the_exit_code(workdir, capsys):
    code, _, err = run(["nowhere.pt", "--debug"], capsys)
    assert code == 2
    assert "Traceback" in err and err.rstrip().endswith("nowhere.pt does not exist")


# -- output paths ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "output", "needles"),
    [
        ("-o", "model.pt", ["would overwrite the input file model.pt"]),
        ("-o", "probe.npy", ["would overwrite the input file probe.npy"]),
        ("-o", f"{ARCH}.py", ["would overwrite the input file", f"{ARCH}.py"]),
        ("-o", "link.json", ["would overwrite the input file"]),
        ("-o", "reports", ["reports", "is a directory"]),
        ("-o", "no/such/dir/report.json", ["no/such/dir", "does not exist"]),
        ("--html", "model.pt", ["--html model.pt would overwrite"]),
        ("--html", "probe.npy", ["--html probe.npy would overwrite"]),
        ("--html", f"{ARCH}.py", [f"--html {ARCH}.py would overwrite"]),
    ],
    ids=["model", "probe", "arch-module", "symlink-to-model", "directory", "missing-directory",
         "html-over-model", "html-over-probe", "html-over-arch-module"],
)  # fmt: skip
def test_output_path_that_would_destroy_an_input_or_cannot_be_written_is_refused(
    workdir, capsys, flag, output, needles
):
    np.save(workdir / "probe.npy", np.ones((4, 8), np.float32))
    (workdir / "reports").mkdir()
    os.symlink(workdir / "model.pt", workdir / "link.json")
    before = listing(workdir)
    code, out, err = run(["model.pt", *MLP, "--probe", "probe.npy", flag, output], capsys)
    assert_refused(code, out, err, *needles)
    assert listing(workdir) == before


@pytest.mark.parametrize("flag", ["-o", "--html"])
@pytest.mark.parametrize("target", ["modelcheck.toml", "team.toml"], ids=["config", "rule-file"])
def test_output_never_replaces_the_config_or_a_rule_file_it_names(workdir, capsys, flag, target):
    config = _config_with_rule_file(TEAM_RULE.replace("treshold", "threshold"))(workdir)
    before = listing(workdir)
    code, out, err = run(["model.pt", *MLP, "--config", config, flag, target], capsys)
    assert_refused(code, out, err, target, "would overwrite")
    assert listing(workdir) == before


def test_output_that_cannot_be_written_is_one_line_and_leaves_nothing(workdir, capsys, monkeypatch):
    import modelcheck.report as report_module

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report_module.os, "fsync", disk_full)
    before = listing(workdir)
    code, out, err = run(["model.pt", *MLP, "-o", "report.json"], capsys)
    assert_refused(code, out, err, "report.json", "could not be written", "No space left")
    assert listing(workdir) == before


def test_report_written_atomically_gets_ordinary_permissions(workdir, capsys):
    previous = os.umask(0o022)
    try:
        code, _, _ = run(["model.pt", *MLP, "--format", "json", "-o", "report.json"], capsys)
    finally:
        os.umask(previous)
    assert code == 0
    assert (workdir / "report.json").stat().st_mode & 0o777 == 0o644
    assert json.loads((workdir / "report.json").read_text())["summary"]["ok"] is True
    assert [p.name for p in workdir.iterdir() if p.name.startswith(".report")] == []


# -- rows that are not errors ----------------------------------------------------------------


def test_nan_in_the_probe_is_a_finding_not_an_error(workdir, capsys):
    x = np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32)
    x[3, 2] = np.nan
    np.save(workdir / "nan.npy", x)
    code, out, err = run(
        ["model.pt", *MLP, "--probe", "nan.npy", "--format", "json", "-o", "r.json"], capsys
    )
    assert code == 1 and err == "" and out == ""
    findings = json.loads((workdir / "r.json").read_text())["findings"]
    assert [(f["rule"], f["severity"]) for f in findings if f["rule"] == "nonfinite"] == [
        ("nonfinite", "error")
    ]
    assert "probe input" in next(f["message"] for f in findings if f["rule"] == "nonfinite")


@pytest.mark.parametrize("cpu", [False, True], ids=["cuda-error", "cpu-allocator-error"])
def test_out_of_memory_retries_smaller_batches_and_says_so(workdir, capsys, cpu):
    kwargs = json.dumps({"fits": 10, "cpu": cpu})
    argv = ["hungry.pt", "--arch", f"{ARCH}:Hungry", "--arch-kwargs", kwargs, "--input-shape", "8"]
    code, out, err = run([*argv, "--max-samples", "100", "--batch-size", "40"], capsys)
    assert code == 0, err
    assert "note: ran out of memory on a batch of 40 samples" in out
    assert "batches of at most 10 (as with --batch-size 10)" in out
    assert "100 samples" in out.splitlines()[-1]
    code, out, _ = run([*argv, "--max-samples", "100", "--batch-size", "40", "--format", "json"],
                       capsys)  # fmt: skip
    data = json.loads(out)
    assert data["probe"]["notes"] == [
        "ran out of memory on a batch of 40 samples, so the probe ran in batches of at most "
        "10 (as with --batch-size 10)"
    ]
    assert data["probe"]["samples"] == 100 and data["probe"]["batches"] == 10


def test_a_probe_that_fits_needs_no_note(workdir, capsys):
    code, out, _ = run(["model.pt", *MLP, "--format", "json"], capsys)
    assert code == 0 and json.loads(out)["probe"]["notes"] == []


# -- interruptions ---------------------------------------------------------------------------


@pytest.fixture
def sigint_raises():
    """Ctrl-C as a terminal delivers it. A job a shell starts in the background (as some CI
    runners do) inherits SIGINT ignored, and Python then leaves it ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _sigint_by_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # in the child, before Python starts


@pytest.mark.parametrize(
    ("signum", "exit_code", "word"),
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
    ids=["ctrl-c", "sigterm"],
)
def test_interruption_mid_check_exits_with_its_code_and_writes_nothing(
    workdir, capsys, sigint_raises, signum, exit_code, word
):
    before = listing(workdir)
    kwargs = json.dumps({"signum": int(signum)})
    code, out, err = run(
        ["interrupted.pt", "--arch", f"{ARCH}:Interrupted", "--arch-kwargs", kwargs,
         "--input-shape", "8", "-o", "report.json"],
        capsys,
    )  # fmt: skip
    assert (code, out, err) == (exit_code, "", f"modelcheck: {word}\n")
    assert listing(workdir) == before


def test_interruption_while_the_report_is_written_leaves_no_partial_file(
    workdir, capsys, monkeypatch
):
    import modelcheck.report as report_module

    real_fdopen = os.fdopen

    def interrupted_write(fd, *args, **kwargs):
        handle = real_fdopen(fd, *args, **kwargs)

        def write(text):
            handle.buffer.write(text[:10].encode())  # half a report reaches the disk
            raise KeyboardInterrupt

        handle.write = write
        return handle

    monkeypatch.setattr(report_module.os, "fdopen", interrupted_write)
    (workdir / "report.json").write_text("last week's report\n")
    before = listing(workdir)
    code, _, err = run(["model.pt", *MLP, "--format", "json", "-o", "report.json"], capsys)
    assert (code, err) == (130, "modelcheck: interrupted\n")
    assert listing(workdir) == before  # the old report is intact, no temporary file is left


def test_real_ctrl_c_stops_the_command_with_130_and_no_partial_file(workdir):
    started = workdir / "started"
    kwargs = json.dumps({"started": str(started)})
    process = subprocess.Popen(
        [sys.executable, "-m", "modelcheck.cli", "interrupted.pt", "--arch", f"{ARCH}:Interrupted",
         "--arch-kwargs", kwargs, "--input-shape", "8", "-o", "report.json"],
        cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=_sigint_by_default,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not started.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert (out, err) == ("", "modelcheck: interrupted\n")
    assert sorted(p.name for p in workdir.iterdir() if p.name.endswith(("json", ".tmp"))) == []
