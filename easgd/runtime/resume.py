"""What a restarted run resumes from: compatible checkpoints, and the progress it had made."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from easgd.config.schema import TrainConfig
from easgd.runtime.checkpoint import Checkpointer, check_compatible

log = logging.getLogger("easgd")


def checkpoint_signature(cfg: TrainConfig, num_params: int) -> dict[str, Any]:
    """What a checkpoint must match to be resumed by this run."""
    return {
        "algorithm": cfg.algorithm.name,
        "model": cfg.model.name,
        "num_params": num_params,
        "workers": cfg.workers,
    }


def resume_state(
    checkpointer: Checkpointer, cfg: TrainConfig, signature: dict[str, Any]
) -> dict[str, Any] | None:
    """The newest intact, compatible checkpoint's state (None: start fresh)."""
    if not cfg.checkpoint.resume:
        return None
    found = checkpointer.latest()
    if found is None:
        return None
    path, state = found
    check_compatible(state, path=path, signature=signature)
    log.info("resuming from %s", path)
    return state


def progress_path(cfg: TrainConfig) -> Path:
    return Path(cfg.run_dir) / "checkpoints" / "progress.json"


def write_progress(cfg: TrainConfig, steps: dict[int, int]) -> None:
    """The server's latest view of each worker's steps, to measure progress redone after a crash."""
    path = progress_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({str(r): s for r, s in steps.items()}))
    os.replace(tmp, path)


def read_progress(cfg: TrainConfig) -> dict[int, int]:
    path = progress_path(cfg)
    if not path.is_file():
        return {}
    return {int(r): int(s) for r, s in json.loads(path.read_text()).items()}
