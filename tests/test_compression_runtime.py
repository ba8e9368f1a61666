"""Compressed exchanges between a real server and workers over gloo (spawned processes, CPU)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from easgd.analysis.audit import conservation_gap
from tests import compression_targets as targets
from tests.dist_helpers import spawn_world

pytestmark = pytest.mark.slow

EPS32 = 2.0**-24


def _torchrun(script: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node=3", str(script), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name", ["bf16", "fp16", "int8"])
def test_compressed_elastic_exchanges_conserve_center_plus_workers(name: str) -> None:
    workers, steps = 2, 30
    results = spawn_world(targets.conservation, workers + 1, steps, name, -1)
    center, exchanges, rejected = results[0]
    start = torch.linspace(-1, 1, targets.NUMEL)
    total = center.double() + sum(results[r][0].double() for r in range(1, workers + 1))
    starts = sum(results[r][1].double() for r in range(1, workers + 1))
    assert exchanges == workers * steps and set(rejected.values()) == {0}
    # float32 variables: each exchange rounds center + e^ and x_i - e^ once each (|values| < 4)
    assert float((total - (start.double() + starts)).abs().max()) <= exchanges * 2 * EPS32 * 4
    assert not torch.allclose(center, start)


def test_refused_compressed_update_restarts_both_ends_from_the_center() -> None:
    workers, steps = 2, 20
    results = spawn_world(targets.conservation, workers + 1, steps, "int8", 5)
    center, exchanges, rejected = results[0]
    assert rejected == {1: 1, 2: 0}
    assert results[1][3] == 1  # worker 1 reset once, then exchanged on with restarted links
    assert bool(torch.isfinite(center).all()) and bool(torch.isfinite(results[1][0]).all())
    assert exchanges == workers * steps - 1  # the refused one is not counted


@pytest.mark.parametrize("name", ["bf16", "int8"])
def test_compressed_downpour_center_is_pushes_minus_residuals(name: str) -> None:
    workers, steps = 2, 25
    results = spawn_world(targets.downpour, workers + 1, steps, name)
    center = results[0][0].double()
    # DOWNPOUR with learning rate 1 pushes -g; each worker's residual is what it still owes
    pushed = -sum(results[r][0].double() for r in range(1, workers + 1))
    residuals = sum(results[r][1].double() for r in range(1, workers + 1))
    gap = center - (pushed - residuals)
    assert float(gap.abs().max()) <= workers * steps * 4 * EPS32 * 0.5
    assert float((center - pushed).abs().max()) > 0  # the codec did round


def test_worker_with_another_format_is_refused_at_hello() -> None:
    results = spawn_world(targets.mismatch, 2)
    assert "server expects comm.compression=none" in results[1]
    assert "worker 1 sends comm.compression=int8, the server expects none" in results[0]


def test_own_loop_api_trains_with_compressed_exchanges() -> None:
    script = Path(__file__).with_name("compressed_own_loop.py")
    result = _torchrun(script, "int8")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("worker link: WorkerLink int8") == 2
    found = re.search(r"center loss ([0-9.]+) -> ([0-9.]+)", result.stdout)
    assert found is not None, result.stdout[-2000:]
    before, after = float(found.group(1)), float(found.group(2))
    assert after < 0.05 * before  # the center learned through int8 exchanges


@pytest.mark.parametrize(
    "extra",
    [[], ["server.shards=2"], ["fault.kill_rank=2", "fault.kill_at_step=150"]],
    ids=["server", "sharded", "worker_killed"],
)
def test_compressed_training_run_keeps_the_ledger_exact(tmp_path: Path, extra: list[str]) -> None:
    nproc = 4 if "server.shards=2" in extra else 3
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc_per_node={nproc}", "--max-restarts=1", "-m", "easgd.train"]
    command += ["workers=2", "steps_per_worker=400", "eval_interval_s=0.1", "progress=false"]
    command += ["comm.compression=int8", "checkpoint.every_s=0.05", "checkpoint.ledger=true"]
    command += ["fault.kill_after_commit=true"] if extra and "fault" in extra[0] else []
    command += [*extra, f"hydra.run.dir={tmp_path}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    done = json.loads((tmp_path / "summary.json").read_text())
    assert done["config"]["comm"]["compression"] == "int8"
    assert done["worker_steps"] == 2 * 400
    if extra and "fault" in extra[0]:
        assert done["restarts"] == 1  # the restarted worker's links restarted from the center
    # center = initial center + every worker's sum of the e^ it applied (float32 additions)
    assert conservation_gap(tmp_path) < 1e-4
    assert done["test_error"] < 0.1
