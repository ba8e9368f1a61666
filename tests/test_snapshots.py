"""Consistent snapshots: a worker dies abruptly mid-run, every process resumes from the newest
committed snapshot, and the run's invariants hold as if nothing had happened."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from easgd.comm.message import Header, Op
from easgd.recovery.snapshot import SnapshotCut, SnapshotLog, StepMarker
from tests import snapshot_targets as targets
from tests.dist_helpers import spawn_world

WORKERS = 3


class Host:
    """A stand-in for the ParameterServer a cut serves: a lock and a counter as its state."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.value = 0

    def running_workers(self) -> list[int]:
        return []

    def state_copy(self) -> dict[str, Any]:
        return {"value": self.value}

    def failed(self) -> bool:
        return False


def test_cut_marks_each_running_worker_once_and_completes_on_acks_or_done() -> None:
    cut, host = SnapshotCut(next_number=5), Host()
    cut.bind(host)
    assert cut.on_message(1, Header(Op.EXCHANGE)) == 0  # no snapshot in progress
    host.value = 7
    assert cut.begin([1, 2, 3]) == 5
    host.value = 8  # the server's part is its state at the start
    assert cut.take_parts() == [(5, {"value": 7})] and cut.take_parts() == []
    assert cut.on_message(1, Header(Op.EXCHANGE)) == 5
    assert cut.on_message(1, Header(Op.EXCHANGE)) == 0  # only its first message counts
    assert cut.on_message(2, Header(Op.DONE)) == 0  # DONE: its final state is its part
    assert cut.complete() is None  # 1 has not confirmed, 3 has not spoken
    assert cut.on_message(1, Header(Op.EXCHANGE, saved_snapshot=5)) == 0
    assert cut.on_message(3, Header(Op.EXCHANGE, saved_snapshot=4)) == 5  # an older ack
    assert cut.complete() is None
    cut.drop(3)  # lost under the continue policy
    assert cut.complete() == 5 and not cut.in_progress
    assert cut.complete() is None  # reported once
    assert cut.begin([]) == 6 and cut.complete() == 6  # nobody running: complete at once
    assert cut.take_parts() == [(6, {"value": 8})]
    assert cut.abandon() == 7 and cut.next_number == 8  # the final snapshot's number


def test_commit_log_keeps_the_newest(tmp_path: Path) -> None:
    log = SnapshotLog(tmp_path, keep=2)
    for number in (3, 4, 7):
        log.commit(number)
    assert log.committed() == [4, 7]


def test_step_marker_counts_redone_steps_across_restarts(tmp_path: Path) -> None:
    marker = StepMarker(tmp_path / "w.step")
    assert marker.start(0, resumed=False) == 0
    for step in range(1, 38):
        marker.mark(step)  # computed up to step 37, then killed
    marker.close()
    marker = StepMarker(tmp_path / "w.step")
    assert marker.start(30, resumed=True) == 7  # resumed at 30: steps 31..37 are redone
    marker.mark(33)  # killed again at 33
    marker.close()
    assert StepMarker(tmp_path / "w.step").start(31, resumed=True) == 7 + 2


@pytest.mark.slow
@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_elastic_center_plus_workers_is_conserved_across_a_kill_and_resume(
    tmp_path: Path, overlap: bool
) -> None:
    steps, world = 60, WORKERS + 1
    first = spawn_world(targets.elastic, world, str(tmp_path), steps, 2, 35, overlap, dead=2)
    _, crashed, committed = first[0]
    assert crashed and committed, "the first run should crash after committing a snapshot"
    second = spawn_world(targets.elastic, world, str(tmp_path), steps, 0, None, overlap)
    center = torch.from_numpy(second[0][0])
    workers = [torch.from_numpy(second[r][0]) for r in range(1, world)]
    resumed = [second[r][1] for r in range(1, world)]
    assert resumed[1] > 0  # the killed worker resumed from its part of a snapshot
    # workers start at START + rank and learn nothing (rate 0): only elastic moves happen, each
    # moving a worker and the center by equal and opposite amounts, so the total is invariant
    expected = targets.START * world + sum(range(1, world))
    assert torch.allclose(center + sum(workers), expected, rtol=0, atol=1e-12)
    assert not torch.allclose(center, targets.START)  # the exchanges did move the center


@pytest.mark.slow
def test_downpour_applies_every_push_exactly_once_across_a_kill_and_resume(tmp_path: Path) -> None:
    steps, period, world = 48, 4, WORKERS + 1
    first = spawn_world(targets.downpour, world, str(tmp_path), steps, 2, 21, period, dead=2)
    assert first[0][1] and first[0][2]
    second = spawn_world(targets.downpour, world, str(tmp_path), steps, 0, None, period)
    assert second[2][1] > 0
    # pushes at t = 0, 4, ..., 44 carry the steps before them: steps - period steps per worker
    expected = -sum(0.125 * r for r in range(1, world)) * (steps - period)
    assert torch.equal(
        torch.from_numpy(second[0][0]), torch.full((targets.NUMEL,), expected, dtype=torch.float64)
    )
