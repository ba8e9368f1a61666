"""What a restarted run resumes from: the newest committed snapshot (see :mod:`.snapshot`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from easgd.config.schema import TrainConfig
from easgd.recovery.checkpoint import Checkpointer, CheckpointError, check_compatible
from easgd.recovery.snapshot import SnapshotLog

log = logging.getLogger("easgd")


def checkpoint_dir(cfg: TrainConfig) -> Path:
    """The run's checkpoint folder."""
    return Path(cfg.run_dir) / "checkpoints"


def checkpoint_signature(cfg: TrainConfig, num_params: int) -> dict[str, Any]:
    """What a checkpoint must match to be resumed by this run."""
    return {
        "algorithm": cfg.algorithm.name,
        "model": cfg.model.name,
        "num_params": num_params,
        "workers": cfg.workers,
    }


def committed_snapshot(cfg: TrainConfig) -> int | None:
    """The newest committed snapshot to resume from (None: start fresh)."""
    if not cfg.checkpoint.resume:
        return None
    return SnapshotLog(checkpoint_dir(cfg)).newest()


def resume_server(
    checkpointer: Checkpointer, cfg: TrainConfig, signature: dict[str, Any]
) -> dict[str, Any] | None:
    """The server's part of the newest committed snapshot (None: start fresh)."""
    return load_server_part(checkpointer, committed_snapshot(cfg), signature)


def load_server_part(
    checkpointer: Checkpointer, number: int | None, signature: dict[str, Any]
) -> dict[str, Any] | None:
    """A server's (or shard's) part of committed snapshot ``number`` (None: start fresh)."""
    if number is None:
        return None
    state = checkpointer.load(number)
    if state is None:
        raise CheckpointError(
            f"snapshot {number} is committed but {checkpointer.path(number)} is missing; "
            "use a fresh run directory or checkpoint.resume=false"
        )
    check_compatible(state, path=checkpointer.path(number), signature=signature)
    log.info("resuming from snapshot %d (%s)", number, checkpointer.path(number))
    return state


def resume_worker(
    checkpointer: Checkpointer, cfg: TrainConfig, signature: dict[str, Any]
) -> dict[str, Any] | None:
    """This worker's part of the newest committed snapshot: its file for that snapshot, or its
    final state if it had finished (or said DONE) by then; None: start fresh."""
    return resume_worker_part(checkpointer, committed_snapshot(cfg), signature)


def resume_worker_part(
    checkpointer: Checkpointer, number: int | None, signature: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """:func:`load_worker_part`, and a final state written after snapshot ``number`` deleted."""
    state = load_worker_part(checkpointer, number, signature)
    if state is None or number is None or checkpointer.path(number).is_file():
        checkpointer.final_path.unlink(missing_ok=True)  # stale: written after this snapshot
    return state


def load_worker_part(
    checkpointer: Checkpointer, number: int | None, signature: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """A worker's part of snapshot ``number``: its file for it, or its final state (None: fresh)."""
    state, path = None, checkpointer.final_path
    if number is not None:
        path = checkpointer.path(number)
        state = checkpointer.load(number)
        if state is None:
            path = checkpointer.final_path
            state = checkpointer.load_final()
        if state is None:
            log.warning("no part of snapshot %d for %s; starting fresh", number, checkpointer.name)
    if state is None:
        return None
    if signature is not None:
        check_compatible(state, path=path, signature=signature)
    if path == checkpointer.final_path:  # saved just before DONE, whose payload the center has
        state["role"].pop("pending_grad", None)
    log.info("resuming from %s", path)
    return state
