"""Two CPU processes with the gloo backend check a model; the merged report must equal a
single-process check of the same batches (stats within float64 rounding, same findings).

The probe keeps every layer within the reservoir (at most 4,096 values), so histograms and
quantiles are exact too; on larger probes each rank draws its own sample and those agree
in distribution only."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from models import dead_relu_model, mlp, saturated_tanh_model, seeded

import modelcheck
from modelcheck import distributed
from modelcheck.errors import ProbeError

WORLD = 2
SAMPLES = 5 * 24  # five batches of 24: the ranks get three and two


# float64 end to end: a float32 forward rounds differently with a different thread count,
# which would hide what is compared here, the merge.
def _probe() -> torch.Tensor:
    return torch.randn(SAMPLES, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


def _models() -> dict[str, torch.nn.Module]:
    return {"dead": dead_relu_model().double(), "saturated": saturated_tanh_model().double()}


def _worker(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for name, model in _models().items():
            report = modelcheck.check(model, _probe(), batch_size=24)
            results[name] = json.loads(report.to_json())
        try:  # one batch for two ranks: every rank must refuse, none may hang
            modelcheck.check(_models()["dead"], _probe()[:10], batch_size=24)
            results["too_few_batches"] = "no error"
        except ProbeError as error:
            results["too_few_batches"] = str(error)
        with open(f"{out}.{rank}", "w") as file:
            json.dump(results, file)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of the two ranks returned, run once for the whole module."""
    folder = tmp_path_factory.mktemp("gloo")
    out = str(folder / "report")
    mp.start_processes(
        _worker, args=(str(folder / "store"), out), nprocs=WORLD, start_method="spawn"
    )
    results = []
    for rank in range(WORLD):
        with open(f"{out}.{rank}") as file:
            results.append(json.load(file))
    return results


def _assert_close(a, b, where):
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a):
            assert math.isnan(b), where
        else:
            assert b == pytest.approx(a, rel=1e-9, abs=1e-12), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_close(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("name", ["dead", "saturated"])
def test_two_gloo_ranks_report_what_one_process_reports(ranks, name):
    single = json.loads(modelcheck.check(_models()[name], _probe(), batch_size=24).to_json())
    merged = ranks[0][name]
    assert merged["probe"]["samples"] == single["probe"]["samples"] == SAMPLES
    assert merged["probe"]["batches"] == single["probe"]["batches"] == 5
    assert [f["rule"] for f in merged["findings"]] == [f["rule"] for f in single["findings"]]
    assert merged["findings"], "the faulty model must have findings to compare"
    _assert_close(single["findings"], merged["findings"], "findings")
    _assert_close(single["layers"], merged["layers"], "layers")


def test_every_rank_returns_rank_zeros_report(ranks):
    for name in ("dead", "saturated"):
        assert ranks[1][name]["findings"] == ranks[0][name]["findings"]
        assert ranks[1][name]["layers"] == ranks[0][name]["layers"]


def test_a_probe_with_fewer_batches_than_ranks_fails_on_every_rank(ranks):
    for result in ranks:
        assert "fewer batches than ranks" in result["too_few_batches"]


def test_without_a_process_group_the_check_runs_alone():
    assert not (dist.is_available() and dist.is_initialized())
    assert distributed.current_group() is None


def test_shard_takes_every_other_batch_starting_at_the_rank():
    group = distributed.Group(rank=1, size=2)
    shard = distributed.shard(list(range(7)), group, presharded=False)
    assert list(shard) == [1, 3, 5]
    assert len(shard) == 3
    assert distributed.shard([0, 1], group, presharded=True) == [0, 1]


def test_command_line_under_torchrun_writes_one_report_for_the_whole_probe(tmp_path):
    (tmp_path / "nets.py").write_text(
        "import torch\nfrom torch import nn\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))\n"
    )
    torch.save(seeded(0)(lambda: mlp([8, 16, 4]))().state_dict(), tmp_path / "net.pt")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}
    env.pop("PYTEST_CURRENT_TEST", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", str(WORLD), "-m", "modelcheck.cli", "net.pt"]
    command += ["--arch", "nets:make", "--format", "json", "--batch-size", "32"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)  # one document: rank 1 wrote nothing
    assert report["probe"]["samples"] == 256 and report["probe"]["batches"] == 8
