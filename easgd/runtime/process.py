"""One process of a run: check the launch, build the components, then serve, work, or run alone.

Rank 0 is the parameter server; ranks 1..p are workers. The sequential baselines (sgd, msgd, asgd,
mvasgd) run in a single process through the same worker role and run log, so that comparisons
are like with like.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from easgd.comm.groups import (
    SERVER_RANK,
    DistEnv,
    check_world,
    choose_backend,
    init_pair_groups,
    shutdown,
)
from easgd.config.schema import TrainConfig
from easgd.runtime.components import build_split
from easgd.runtime.sequential import run_sequential
from easgd.runtime.server_main import run_server
from easgd.runtime.worker_main import run_worker


def setup_logging(rank: int) -> None:
    """Log lines prefixed by the process's role."""
    name = "server" if rank == SERVER_RANK else f"worker{rank}"
    logging.basicConfig(
        level=os.environ.get("EASGD_LOG_LEVEL", "INFO"),
        format=f"[{name}] %(levelname)s %(message)s",
        force=True,
    )


def run_process(cfg: TrainConfig) -> dict[str, Any] | None:
    """Run this process's part; the server (or sequential process) returns the run summary."""
    # -- scale: topology=allreduce (no server rank) and server.shards > 1 lay out their ranks --
    if cfg.topology == "allreduce" and cfg.algorithm.uses_server:
        from easgd.runtime.allreduce import run_allreduce

        return run_allreduce(cfg)
    if cfg.server.shards > 1 and cfg.algorithm.uses_server:  # ranks 0..k-1 hold the center
        from easgd.runtime.sharded_main import run_sharded

        return run_sharded(cfg)
    # -- end scale --
    env = DistEnv.from_environ()
    check_world(env, expected_world_size=cfg.world_size, workers=cfg.workers)
    torch.set_num_threads(cfg.threads)
    setup_logging(env.rank)
    split = build_split(cfg.data)
    if not cfg.algorithm.uses_server:
        return run_sequential(cfg, split)
    backend = choose_backend(cfg.comm.backend)
    pairs = init_pair_groups(env, backend=backend, timeout_s=cfg.comm.timeout_s)
    try:
        if env.rank == SERVER_RANK:
            return run_server(cfg, env, split, pairs)
        run_worker(cfg, env, split, pairs)
        return None
    finally:
        shutdown()
