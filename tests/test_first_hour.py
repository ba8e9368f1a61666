"""A user's first hour, for real: concurrent runs, a finished run never overwritten, SIGTERM then
``resume=latest``, and refusals that write nothing (each a real ``python -m easgd.train``).

Every wait is on an event (a process's exit, a row in metrics.csv), never on a fixed delay.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from easgd.parts.assembly import RunParts
from easgd.recovery.checkpoint import Checkpointer
from easgd.recovery.snapshot import SnapshotLog
from easgd.topologies.server import evaluate_center
from tests.test_configs import composed

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
QUICK = ["progress=false", "tensorboard=false"]


def train(cwd: Path, *overrides: str, **popen: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "easgd.train", *overrides],
        cwd=cwd,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,  # type: ignore[call-overload]
    )


def finished(process: subprocess.Popen[str], timeout: float = 240) -> tuple[int, str]:
    _, err = process.communicate(timeout=timeout)
    return process.returncode, err


def folders(cwd: Path) -> list[Path]:
    runs = cwd / "runs"
    return sorted(p for p in runs.iterdir() if p.name != "latest") if runs.is_dir() else []


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_runs_started_together_never_share_a_folder_and_a_finished_one_is_kept(
    tmp_path: Path,
) -> None:
    sim = ["mode=simulate", "steps_per_worker=60", "workers=2", "comm.period=5", *QUICK]
    runs = [train(tmp_path, *sim, f"algorithm={name}") for name in ("eamsgd", "downpour")]
    results = [finished(run) for run in runs]
    assert all(rc == 0 for rc, _ in results), [err[-2000:] for _, err in results]
    made = folders(tmp_path)
    assert len(made) == 2
    for folder in made:
        algorithm = folder.name.split("_")[2]
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["algorithm"] == algorithm
        assert (
            (folder / ".hydra" / "overrides.yaml")
            .read_text()
            .endswith(f"- algorithm={algorithm}\n")
        )
        rows = metric_rows(folder)
        steps = [int(r["worker_steps"]) for r in rows]
        assert steps == sorted(steps) and steps[-1] == 2 * 60  # one run's rows only
    # a finished run is never written into again, through hydra.run.dir or resume=
    done = made[0]
    before = files_of(done)
    for override in (f"hydra.run.dir={done}", f"resume={done}"):
        rc, err = finished(train(tmp_path, *sim, "algorithm=eamsgd", override))
        assert rc == 2, err[-2000:]
        assert err.strip().splitlines() == [
            f"easgd: error: {done} holds a finished run (summary.json, stop_reason=steps); a "
            "finished run is never overwritten: leave out hydra.run.dir/resume to start a fresh "
            "run folder"
        ]
    assert files_of(done) == before
    assert folders(tmp_path) == made  # and no fresh folder was left behind by the refusals


def metric_rows(folder: Path) -> list[dict[str, str]]:
    path = folder / "metrics.csv"
    if not path.exists():
        return []
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_sigterm_commits_a_snapshot_and_an_interrupted_summary_then_resume_latest_goes_on_exactly(
    tmp_path: Path,
) -> None:
    overrides = [*QUICK, "workers=2", "eval_interval_s=0.2", "checkpoint.every_s=0"]
    run = train(tmp_path, *overrides, "steps_per_worker=1000000", start_new_session=True)
    deadline = time.monotonic() + 120  # a bound on a failure, not a wait for success
    while run.poll() is None and time.monotonic() < deadline:
        made = folders(tmp_path)
        if made and len(metric_rows(made[0])) >= 3:  # training is under way
            break
        time.sleep(0.05)
    assert run.poll() is None, run.communicate()[1][-3000:]
    os.killpg(run.pid, signal.SIGTERM)  # what SLURM sends before preemption
    rc, err = finished(run)
    folder = folders(tmp_path)[0]
    assert rc == 128 + signal.SIGTERM, err[-3000:]
    assert (
        f"easgd: interrupted; resume with:\n  python -m easgd.train {' '.join(overrides)} " in err
    )
    assert err.rstrip().endswith(f"steps_per_worker=1000000 resume=runs/{folder.name}")
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["stop_reason"] == "interrupted"
    # the committed snapshot is the final center: it evaluates to the summary's figures exactly
    number = SnapshotLog(folder / "checkpoints").newest()
    assert number is not None
    server = Checkpointer(folder / "checkpoints", "server").load(number)
    assert server is not None and server["finished"] == []  # both workers stopped short
    steps = {int(r): s for r, s in server["steps"].items()}
    assert (
        sum(steps.values()) == summary["worker_steps"]
        and server["exchanges"] == summary["exchanges"]
    )
    cfg = composed(*overrides)
    parts = RunParts.load(cfg)
    center = server["role"]["center"]
    assert (
        evaluate_center(parts.flat_model(), parts.split, center)["test_loss"]
        == summary["test_loss"]
    )
    # resume=latest: the same folder, every worker from its step, to a budget a little further on
    budget = max(steps.values()) + 40
    interrupted_rows = len(metric_rows(folder))
    rc, err = finished(train(tmp_path, *overrides, f"steps_per_worker={budget}", "resume=latest"))
    assert rc == 0, err[-3000:]
    assert "resuming the run in" in err and folders(tmp_path) == [folder]
    resumed = json.loads((folder / "summary.json").read_text())
    assert resumed["stop_reason"] == "steps" and resumed["restarts"] == 1
    assert {int(r): s for r, s in resumed["resumed_worker_steps"].items()} == steps
    assert resumed["worker_steps"] == 2 * budget
    assert resumed["resumed_exchanges"] == summary["exchanges"]
    rows = metric_rows(folder)
    assert len(rows) > interrupted_rows
    for key in ("wall_s", "worker_steps", "exchanges"):  # the clocks go on, never back
        values = [float(r[key]) for r in rows]
        assert values == sorted(values), key


def test_a_refused_config_writes_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "data"
    bad.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):  # fmt: skip
        (bad / name).write_bytes(b"\x00\x00\x08\x03garbage")
    cases = {
        "data=mnist": ["data=mnist", f"data.root={bad}"],
        "period": ["comm.period=30", "steps_per_worker=20"],
        "resume": ["resume=latest"],
    }
    for name, overrides in cases.items():
        rc, err = finished(train(tmp_path, *QUICK, *overrides))
        assert rc == 2, (name, err[-2000:])
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("easgd: error: "), (name, err[-2000:])
    assert sorted(os.listdir(tmp_path)) == ["data"]  # no runs/, no empty run folder


def test_a_sweep_under_torchrun_is_refused_before_any_folder(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "easgd.train", "-m", "seed=0,1"],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("easgd: error:")]
    assert errors == [
        "easgd: error: a sweep (-m) cannot run under torchrun: torchrun starts the processes of "
        "one run; run the sweep without torchrun (python -m easgd.train -m ...), which launches "
        "every run itself"
    ]
    assert os.listdir(tmp_path) == []
