"""Failures under real torchrun, each told apart and ending promptly: a server error, a hung or
stuck worker, a slow worker that is not hung, a lost worker, a stop rule, a replaced node."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from easgd.recovery.checkpoint import Checkpointer
from tests.test_train_e2e import ROOT, run

pytestmark = pytest.mark.slow

# these tests are about a fixed roster: a lost, stuck or failing process ends (or restarts) the
# job; with elastic membership its keeper would replace it instead (tests/test_membership.py)
BASE = ["progress=false", "tensorboard=false", "eval_interval_s=0.2", "membership.mode=fixed"]


def torchrun(
    nproc: int, *overrides: str, restarts: int = 0
) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.perf_counter()
    result = run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
         f"--max-restarts={restarts}", "-m", "easgd.train", *BASE, *overrides],
        timeout=120,
    )  # fmt: skip
    return result, time.perf_counter() - started


def processes_of(marker: str) -> list[int]:
    """Live (not zombie) processes whose command line contains ``marker`` (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            state = (entry / "stat").read_text().rpartition(")")[2].split()[0]
            if marker.encode() in (entry / "cmdline").read_bytes() and state != "Z":
                pids.append(int(entry.name))
    return pids


def kill_all(pids: list[int]) -> None:
    """SIGKILL each process (after SIGCONT, so a stopped one is not left behind)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)


def test_server_error_reaches_the_workers_and_ends_the_run_with_its_traceback(
    tmp_path: Path,
) -> None:
    result, wall = torchrun(
        3, "workers=2", "steps_per_worker=100000", "fault.raise_rank=0", "fault.raise_at_step=20",
        f"hydra.run.dir={tmp_path}",
    )  # fmt: skip
    assert result.returncode != 0
    log = result.stderr
    assert "server error, ending the run" in log and "Traceback" in log
    assert "RuntimeError: fault injection: the server raises at update 20" in log
    assert log.count("the server failed and ended the run") == 2  # each worker was told
    assert " lost (" not in log  # not mistaken for a lost worker
    assert wall < 30  # ends in seconds, not at the end of a 100,000-step budget or a timeout


def stopped(pids: list[int]) -> list[int]:
    """The processes among ``pids`` that are stopped (state T)."""
    found = []
    for pid in pids:
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "T":
                found.append(pid)
    return found


def torchrun_continuing_stopped(
    nproc: int, *overrides: str, run_dir: Path, failed: str = "RuntimeError: a worker failed"
) -> tuple[subprocess.CompletedProcess[str], float]:
    """torchrun, and once the server has exited on its error (``failed`` is in the log), the
    documented remedy for a stopped worker: SIGCONT, so torchrun's pending SIGTERM ends it
    (instead of torchrun's fixed 30 s wait before SIGKILL, a torch behaviour measured in
    docs/reliability.md)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "easgd.train", *BASE, *overrides]  # fmt: skip
    log_path = run_dir.parent / f"{run_dir.name}.stderr"
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.DEVNULL, stderr=log, text=True,
        )  # fmt: skip
        try:
            deadline = started + 60
            while proc.poll() is None and time.perf_counter() < deadline:
                if failed in log_path.read_text():
                    for pid in stopped(processes_of(str(run_dir))):
                        os.kill(pid, signal.SIGCONT)
                time.sleep(0.2)
            proc.wait(timeout=max(1.0, deadline - time.perf_counter()))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    wall = time.perf_counter() - started
    return subprocess.CompletedProcess(command, proc.returncode, "", log_path.read_text()), wall


@pytest.mark.parametrize("mode", ["sigstop", "loop"])
def test_hung_or_stuck_worker_is_detected_from_its_training_loop(tmp_path: Path, mode: str) -> None:
    # "loop": only the training loop blocks and the heartbeat thread runs on, so a heartbeat
    # from a thread of its own would never notice; "sigstop": the whole process is stopped at
    # step 100, typically within the heartbeat's first 0.5 s publishing interval
    overrides = [
        "workers=2", "steps_per_worker=100000", "comm.heartbeat_timeout_s=1", "fault.hang_rank=2",
        "fault.hang_at_step=100", f"fault.hang_mode={mode}", f"hydra.run.dir={tmp_path}",
    ]  # fmt: skip
    try:
        if mode == "sigstop":
            result, wall = torchrun_continuing_stopped(3, *overrides, run_dir=tmp_path)
        else:
            result, wall = torchrun(3, *overrides)
    finally:
        left = processes_of(str(tmp_path))  # the run directory is on every rank's command line
        kill_all(left)
    assert left == []  # no stopped (or stuck) orphan outlives torchrun
    assert result.returncode != 0
    log = result.stderr
    lost = re.search(
        r"worker 2 lost \(its training loop has not advanced for [\d.]+ s \(allowance ([\d.]+) s",
        log,
    )
    assert lost is not None, log[-3000:]
    assert float(lost.group(1)) < 5  # its measured pace, not the warm-up allowance (120 s)
    assert "worker 1 lost" not in log and "RuntimeError: a worker failed: worker 2" in log
    # the server ends the run in seconds; a stuck (not stopped) process ends on torchrun's
    # SIGTERM, a stopped one once continued
    assert wall < 30


def test_slow_worker_is_not_declared_lost(tmp_path: Path) -> None:
    # worker 2 takes 0.75 s per step: its messages are 9 s apart, beyond both the heartbeat
    # timeout (0.3 s) and the gloo timeout (3 s), yet its loop advances
    result, _ = torchrun(
        3, "workers=2", "steps_per_worker=12", "comm.period=12", "model.name=custom",
        "model.target=tests.bn_models.slow_on_rank2_mlp", "comm.heartbeat_timeout_s=0.3",
        "comm.timeout_s=3", f"hydra.run.dir={tmp_path}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["failed_workers"] == {} and summary["worker_steps"] == 2 * 12
    assert (
        summary["details"]["worker_steps_per_s"]["2"] < 4
    )  # 12 steps took > 3 s: beyond the gloo timeout


def test_lost_worker_ends_the_run_promptly(tmp_path: Path) -> None:
    result, wall = torchrun(
        4, "workers=3", "steps_per_worker=100000", "fault.kill_rank=2", "fault.kill_at_step=100",
        f"hydra.run.dir={tmp_path}",
    )  # fmt: skip
    assert result.returncode != 0
    assert (
        "worker 2 lost" in result.stderr and "stopping (worker_failure=fail_fast)" in result.stderr
    )
    assert wall < 30


def test_stop_rule_ends_the_run_promptly(tmp_path: Path) -> None:
    result, wall = torchrun(
        3, "workers=2", "steps_per_worker=1000000", "max_wall_s=2", f"hydra.run.dir={tmp_path}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stop_reason"] == "max_wall_s" and summary["wall_time_s"] < 4
    assert wall < 25


def test_replaced_node_rejoins_a_restarted_job(tmp_path: Path) -> None:
    """Two torchrun agents; one is killed with its workers and a fresh one (restart count 0)
    takes its place: every rank must agree on the store prefix of the new rendezvous round,
    and the job resumes from the committed snapshot and finishes its budget exactly."""
    from tests.dist_helpers import free_port

    port, steps = free_port(), 1500
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=2",
        "--max-restarts=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
        "--rdzv-id=replace", "--monitor-interval=0.1",
        # a killed agent's rendezvous entry expires after 1 s x 3 missed keep-alives (15 s by default)
        "--rdzv-conf=keep_alive_interval=1,keep_alive_max_attempt=3",
        "-m", "easgd.train", *BASE, "workers=3", f"steps_per_worker={steps}",
        "comm.slowdown=[4,4,4]", "checkpoint.every_s=0.2", "checkpoint.keep=100000",
        f"hydra.run.dir={tmp_path}",
    ]  # fmt: skip
    # torch 2.13's shared store hangs a replacement node (docs/reliability.md): opt out of it
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    logs: list[Path] = []

    def agent(name: str) -> subprocess.Popen[bytes]:
        logs.append(tmp_path / f"agent_{name}.log")
        with open(logs[-1], "wb") as out:  # a file, not a pipe nobody reads while we wait
            return subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    def children(pid: int) -> list[int]:
        found = []
        for entry in Path("/proc").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):
                if int((entry / "stat").read_text().rpartition(")")[2].split()[1]) == pid:
                    found.append(int(entry.name))
        return found

    committed = tmp_path / "checkpoints" / "committed.json"
    try:
        host = agent("host")  # started first: it hosts the rendezvous store
        time.sleep(1.0)
        doomed = agent("doomed")
        deadline = time.monotonic() + 60
        while not committed.exists() and time.monotonic() < deadline and doomed.poll() is None:
            time.sleep(0.02)
        assert committed.exists(), "no snapshot was committed within 60 s"
        workers = children(doomed.pid)  # torchrun starts each worker in a session of its own
        kill_all([doomed.pid, *workers])  # the node is gone: agent and workers at once
        doomed.wait()
        assert len(workers) == 2 and doomed.returncode == -signal.SIGKILL  # it was mid-run
        fresh = agent("fresh")  # restart count 0, while the surviving agent's is 1
        with contextlib.suppress(subprocess.TimeoutExpired):
            host.wait(timeout=90)
            fresh.wait(timeout=30)
    finally:
        kill_all(processes_of(str(tmp_path)))
    text = "".join(path.read_text(errors="replace") for path in logs)
    assert host.returncode == 0 and fresh.returncode == 0, text[-6000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["restarts"] == 1 and summary["stop_reason"] == "steps"
    assert summary["worker_steps"] == 3 * steps and summary["failed_workers"] == {}
    # every worker resumed from its part of the committed snapshot the new server resumed from
    resumed = [int(n) for n in re.findall(r"\[server\] INFO resuming from snapshot (\d+)", text)]
    assert len(resumed) == 1, text[-5000:]
    for rank in (1, 2, 3):
        part = Checkpointer(tmp_path / "checkpoints", f"worker{rank}").load(resumed[0])
        assert part is not None, f"worker {rank}'s part of snapshot {resumed[0]} is missing"
        assert summary["resumed_worker_steps"][str(rank)] == int(part["role"]["step"]) > 0
