"""Runtime paths with exact expectations under real torchrun: MDOWNPOUR and ADOWNPOUR, the
divergence guard (max_update_norm), messages above the framing limit, overlap with a NaN reset."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from easgd.comm.transport import FRAME_LIMIT
from easgd.recovery.checkpoint import Checkpointer
from easgd.recovery.snapshot import SnapshotLog
from tests.test_train_e2e import run

pytestmark = pytest.mark.slow


def torchrun(tmp_path: Path, *overrides: str) -> dict:
    result = run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3",
         "-m", "easgd.train", "workers=2", "progress=false", "tensorboard=false",
         *overrides, f"hydra.run.dir={tmp_path}"],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    summary["_stderr"] = result.stderr
    return summary


def test_mdownpour_applies_one_server_step_per_gradient(tmp_path: Path) -> None:
    done = torchrun(tmp_path, "algorithm=mdownpour", "comm.period=1", "steps_per_worker=150")
    # a worker's exchange at t sends the gradient of step t - 1 (none at t = 0) and DONE sends
    # the last one: every one of its 150 gradients is one server step
    assert done["server_updates"] == 2 * 150
    assert done["exchanges"] == 2 * 150 and done["test_error"] < 0.3


def test_adownpour_evaluates_the_average_through_the_runtime(tmp_path: Path) -> None:
    done = torchrun(tmp_path, "algorithm=adownpour", "comm.period=5", "steps_per_worker=200")
    assert done["server_updates"] == done["exchanges"] == 2 * 200 // 5
    state = Checkpointer(tmp_path / "checkpoints", "server").load(
        SnapshotLog(tmp_path / "checkpoints").committed()[-1]
    )
    assert state is not None and "average" in state["role"]
    assert not torch.equal(state["role"]["average"], state["role"]["center"])
    assert done["test_error"] < 0.3


def test_max_update_norm_refuses_every_oversized_update(tmp_path: Path) -> None:
    done = torchrun(
        tmp_path,
        "algorithm=easgd",
        "steps_per_worker=50",
        "comm.period=10",
        "max_update_norm=1e-12",
    )
    # the first exchange of each worker (t = 0, x = center) moves nothing and passes; every
    # later one (t = 10, ..., 40) is an elastic move larger than 1e-12 and is refused
    assert done["details"]["rejected_messages"] == 2 * 4
    assert done["server_updates"] == done["exchanges"] == 2
    assert "max_update_norm" in done["_stderr"]


def test_messages_above_the_framing_limit(tmp_path: Path) -> None:
    # digits: 64 inputs; 64*2048 + 2048 + 2048*10 + 10 = 153,610 parameters > FRAME_LIMIT
    assert FRAME_LIMIT < 153_610
    done = torchrun(tmp_path, "model.hidden=[2048]", "steps_per_worker=60", "comm.period=5")
    assert done["num_params"] == 153_610
    assert done["exchanges"] == 2 * 60 // 5 and done["test_error"] < 0.3


def test_overlap_with_a_nan_reset(tmp_path: Path) -> None:
    done = torchrun(
        tmp_path, "algorithm=easgd", "comm.overlap=true", "steps_per_worker=200",
        "fault.nan_rank=1", "fault.nan_at_step=55",
    )  # fmt: skip
    assert (
        done["details"]["rejected_messages"] == 1 and "refused worker 1's update" in done["_stderr"]
    )
    state = Checkpointer(tmp_path / "checkpoints", "server").load(
        SnapshotLog(tmp_path / "checkpoints").committed()[-1]
    )
    assert state is not None and torch.isfinite(state["role"]["center"]).all()
    assert done["test_error"] < 0.2
