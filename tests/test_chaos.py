"""Chaos under real torchrun: killed workers and servers, raising and diverging workers.

Failures are injected with the fault.* config (first attempt only), like torchft's EventInjector.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from easgd.analysis.audit import conservation_gap
from easgd.recovery.checkpoint import Checkpointer
from tests.test_train_e2e import ROOT, run, torchrun

pytestmark = pytest.mark.slow


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.parametrize(("rank", "at_step"), [(2, 300), (0, 40)], ids=["worker", "server"])
def test_sigkill_mid_run_resumes_from_checkpoints_after_restart(
    tmp_path: Path, rank: int, at_step: int
) -> None:
    args = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", "--max-restarts=1",
        "-m", "easgd.train", "workers=3", "steps_per_worker=600", "eval_interval_s=0.1", "checkpoint.every_s=0.05", "checkpoint.ledger=true",
        f"fault.kill_rank={rank}", f"fault.kill_at_step={at_step}", "fault.kill_after_commit=true",
        "progress=false", f"hydra.run.dir={tmp_path}",
    ]  # fmt: skip
    result = run(args)
    assert result.returncode == 0, result.stderr[-3000:]
    killed = re.search(r"sends itself SIGKILL at step (\d+)", result.stderr)
    assert killed is not None  # at the first step >= at_step after the first commit
    died_at = int(killed.group(1))
    assert died_at >= at_step
    done = summary(tmp_path)
    assert done["restarts"] == 1
    assert done["worker_steps"] == 3 * 600  # every worker finished its budget in the end
    assert sum(done["resumed_worker_steps"].values()) > 0  # resumed, not restarted from scratch
    if rank != 0:  # the killed worker computed exactly up to the step it died at
        assert (
            done["details"]["redone_steps_by_worker"][str(rank)]
            == died_at - done["resumed_worker_steps"][str(rank)]
        )
    assert done["details"]["redone_worker_steps"] == sum(
        done["details"]["redone_steps_by_worker"].values()
    )
    # the final snapshot is consistent: center = initial center + every worker's ledger
    assert conservation_gap(tmp_path) < 1e-4
    assert done["test_error"] < 0.1


def test_worker_that_raises_under_continue_policy_lets_the_others_finish(tmp_path: Path) -> None:
    result = torchrun(
        4, "workers=3", "steps_per_worker=300", "worker_failure=continue",
        "fault.raise_rank=3", "fault.raise_at_step=50", f"hydra.run.dir={tmp_path}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    done = summary(tmp_path)
    assert list(done["failed_workers"]) == ["3"]
    assert done["worker_steps"] >= 2 * 300 + 40  # workers 1 and 2 finished; 3 stopped near step 50
    assert done["test_error"] < 0.15


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """One finished 2-worker run whose worker 1 sends NaNs at step 55 (its folder and result):
    the NaN test checks the run, the resume test restarts from a copy of its checkpoints."""
    run_dir = tmp_path_factory.mktemp("nan_run")
    result = torchrun(
        3, "workers=2", "steps_per_worker=200", "fault.nan_rank=1", "fault.nan_at_step=55",
        f"hydra.run.dir={run_dir}",
    )  # fmt: skip
    return run_dir, result


def test_nan_worker_is_refused_and_reset_and_the_center_stays_finite(
    nan_run: tuple[Path, subprocess.CompletedProcess],
) -> None:
    run_dir, result = nan_run
    assert result.returncode == 0, result.stderr[-3000:]
    done = summary(run_dir)
    assert done["details"]["rejected_messages"] >= 1
    assert "refused worker 1's update" in result.stderr
    path, state = Checkpointer(run_dir / "checkpoints", "server").latest()  # type: ignore[misc]
    assert torch.isfinite(state["role"]["center"]).all()
    assert done["test_error"] < 0.2


def test_resuming_with_another_model_is_refused_and_keeps_the_checkpoint(
    tmp_path: Path, nan_run: tuple[Path, subprocess.CompletedProcess]
) -> None:
    first_dir, first = nan_run
    assert first.returncode == 0, first.stderr[-3000:]
    shutil.copytree(first_dir, tmp_path, dirs_exist_ok=True)  # the finished run's folder
    (tmp_path / "summary.json").unlink()  # as if it had crashed: a folder to resume
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert before  # the first run left checkpoints to resume from
    args = ("workers=2", "steps_per_worker=50", "model=lenet", f"hydra.run.dir={tmp_path}")
    second = torchrun(3, *args)  # refused before launch by the folder's run.json
    assert second.returncode != 0
    assert (
        f"cannot resume {tmp_path}: it holds a run with model=mlp, this config has model=lenet"
        in second.stderr
    )
    (tmp_path / "run.json").unlink()  # without it, the checkpoint's own signature refuses
    third = torchrun(3, *args)
    assert third.returncode != 0
    assert (
        "was written by a different run" in third.stderr
        and "checkpoint.resume=false" in third.stderr
    )
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["data=mnist", "data.root=/nonexistent/mnist"],
            "data.root=/nonexistent/mnist is not a folder",
        ),
        (["data=cifar10", "data.root={tmp}"], "CIFAR-10 file(s) data_batch_1"),
        (["model.name=custom", "model.target=no.such.Model"], "cannot import 'no.such.Model'"),
    ],
)
def test_bad_files_fail_before_processes_start(
    tmp_path: Path, overrides: list[str], message: str
) -> None:
    overrides = [o.replace("{tmp}", str(tmp_path)) for o in overrides]
    result = subprocess.run(
        [sys.executable, "-m", "easgd.train", *overrides, f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr


def test_chaos_benchmark_quick(tmp_path: Path) -> None:
    result = run(
        [sys.executable, "benchmarks/chaos.py", "--quick", "--out", str(tmp_path),
         "--scratch", str(tmp_path / "scratch")],
        timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads((tmp_path / "chaos_quick.json").read_text())
    worker = figures["kills"]["worker"]
    assert worker["killed"] + worker["not_killed_in_time"] == 1
    assert worker["survived"] == worker["conservation_held"] == worker["killed"]
    soak = figures["soak"]
    assert soak["returncode"] == 0 and soak["samples"] >= 2
    assert abs(soak["growth_total"]) < 0.5  # a leak of this size would show in seconds
    assert "worker kills: survived" in (tmp_path / "chaos_quick.log").read_text()
