"""--device, --quiet and the progress bar; memory-mapped .npy probes streamed batch by batch."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from models import mlp, seeded

import modelcheck
from modelcheck import progress
from modelcheck.cli import main
from modelcheck.probe import probe_from_spec


@pytest.fixture
def checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # Named for this file: a module named like another test's (pytester's nets.py) would be
    # the one already imported, whichever test ran first.
    (tmp_path / "run_options_nets.py").write_text(
        "from torch import nn\n"
        "def make():\n"
        "    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.save(seeded(0)(lambda: mlp([8, 16, 4]))().state_dict(), tmp_path / "net.pt")
    return ["net.pt", "--arch", "run_options_nets:make"]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_device_cpu_runs_the_check_there(checkpoint, capsys):
    code = main([*checkpoint, "--device", "cpu", "--format", "json"])
    out = capsys.readouterr().out
    assert code == 0
    assert '"device": "cpu"' in out


@pytest.mark.parametrize(
    ("device", "needle"),
    [("gpu0", "is not a device"), ("cuda:7", "cuda:7"), ("meta", "no meta device")],
    ids=["not-a-device", "cuda-that-is-not-there", "a-device-type-with-no-backend"],
)
def test_unusable_device_exits_two_with_one_line(checkpoint, capsys, device, needle):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has an eighth CUDA device")
    code = main([*checkpoint, "--device", device])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("modelcheck: error: --device")
    assert needle in err[0]


def test_a_seed_beyond_32_bits_exits_two_with_one_line(checkpoint, capsys):
    code = main([*checkpoint, "--seed", str(2**32)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert (
        err[0]
        == f"modelcheck: error: command line: seed: expected an integer <= {2**32 - 1}, got {2**32}"
    )
    assert main([*checkpoint, "--seed", str(2**32 - 1), "--format", "json"]) == 0


def test_progress_bar_is_off_under_pytest_and_off_a_terminal(monkeypatch):
    monkeypatch.setattr("sys.stderr", _Terminal())
    assert not progress.wanted(True)  # PYTEST_CURRENT_TEST is set while a test runs
    monkeypatch.delenv("PYTEST_CURRENT_TEST")
    assert progress.wanted(True)
    assert not progress.wanted(False)  # --quiet
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert not progress.wanted(True)  # not a terminal


def test_progress_bar_counts_batches_on_a_terminal_and_clears_itself(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    monkeypatch.delenv("PYTEST_CURRENT_TEST")
    monkeypatch.setattr(progress, "DELAY_SECONDS", 0.0)  # draw even for a quick check
    model = seeded(0)(lambda: mlp([8, 16, 4]))()
    modelcheck.check(model, torch.randn(40, 8), batch_size=8)
    drawn = terminal.getvalue()
    assert "modelcheck" in drawn and "/5 [" in drawn  # five batches of eight
    assert drawn.endswith("\r") and drawn.rsplit("\r", 2)[-2].strip() == ""  # cleared
    terminal.truncate(0)
    modelcheck.check(model, torch.randn(40, 8), batch_size=8, progress=False)
    assert terminal.getvalue() == ""


def test_quiet_flag_turns_the_progress_bar_off(checkpoint, monkeypatch, capsys):
    seen = []
    real = progress.bar

    def spy(items, enabled, total):
        seen.append(enabled)
        return real(items, enabled, total)

    monkeypatch.setattr(progress, "bar", spy)
    main([*checkpoint])
    main([*checkpoint, "--quiet"])
    capsys.readouterr()
    assert seen == [True, False]


def test_npy_probe_is_memory_mapped_and_read_one_batch_at_a_time(tmp_path):
    path = tmp_path / "probe.npy"
    np.save(path, np.random.default_rng(0).standard_normal((1000, 8)).astype(np.float32))
    probe = probe_from_spec(str(path), batch_size=100)
    assert isinstance(probe.batches.inputs, np.memmap)  # the file is not loaded whole
    batches = iter(probe.batches)
    first = next(batches).inputs
    assert first.shape == (100, 8) and not isinstance(first.numpy(), np.memmap)
    report = modelcheck.check(seeded(0)(lambda: mlp([8, 16, 4]))(), probe)
    assert report.probe.samples == 1000 and report.probe.batches == 10


def test_a_long_probe_spreads_the_same_sample_over_all_its_batches():
    model = seeded(0)(lambda: mlp([256, 256, 4]))()
    x = torch.randn(40 * 64, 256, generator=torch.Generator().manual_seed(1))
    report = modelcheck.check(model, x, batch_size=64, gradients=False)
    per_batch = 16 * 16_384 // 40
    assert report.probe.sample_size == per_batch
    hidden = report.layers[0].activation
    assert hidden.count == 40 * 64 * 256
    assert hidden.sample_size == 40 * per_batch
    assert hidden.histogram_sample_size == 4_096  # the reservoir does not shrink with the rate
    # Up to 16 batches, each batch gives the full per-batch sample.
    short = modelcheck.check(model, x[: 16 * 64], batch_size=64, gradients=False)
    assert short.probe.sample_size == 16_384
    assert short.layers[0].activation.sample_size == 16 * 16_384
