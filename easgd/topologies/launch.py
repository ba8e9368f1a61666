"""Start a run: in this process (under torchrun, or a one-process baseline), or as p + 1 real
processes through torch's own elastic launch API (what torchrun uses), for ``python -m easgd.train``
and Hydra sweeps.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from omegaconf import OmegaConf

from easgd.comm.groups import under_launcher
from easgd.config.schema import TrainConfig, to_dict, validate
from easgd.topologies.registry import run_process


def _child(config: dict[str, Any]) -> dict[str, Any] | None:
    """Entry point of each launched process (module level, so it can be pickled for spawn)."""
    return run_process(validate(OmegaConf.create(config)))


def start_processes(
    entry: Callable[..., Any], nproc: int, *args: Any, max_restarts: int = 0
) -> dict[int, Any]:
    """Run ``entry(*args)`` in ``nproc`` fresh processes on this node, as torchrun would.

    Each process gets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT and a shared rendezvous run
    id; returns {rank: return value}.
    """
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"easgd-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        max_restarts=max_restarts,
        monitor_interval=0.1,
        start_method="spawn",
    )
    return elastic_launch(config, entry)(*args)


def launch(cfg: TrainConfig, *, max_restarts: int = 0) -> dict[str, Any] | None:
    """Run ``cfg`` and return the summary (None on worker ranks under torchrun)."""
    if under_launcher() or cfg.world_size == 1:
        return run_process(cfg)
    return start_processes(_child, cfg.world_size, to_dict(cfg), max_restarts=max_restarts)[0]
