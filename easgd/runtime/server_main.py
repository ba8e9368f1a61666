"""Rank 0's part of a run: build the server role, resume, serve, snapshot, summarise."""

from __future__ import annotations

import logging
import os
from typing import Any

from torch import Tensor

from easgd.comm.groups import (
    SERVER_RANK,
    DistEnv,
    PairGroups,
    check_world,
    choose_backend,
    init_pair_groups,
    shutdown,
)
from easgd.comm.heartbeat import HeartbeatMonitor
from easgd.config.schema import TrainConfig
from easgd.data.split import Split
from easgd.flat import FlatModel
from easgd.roles import make_server_role
from easgd.runtime.checkpoint import Checkpointer
from easgd.runtime.components import evaluator_for, transport_for
from easgd.runtime.faults import FaultInjector
from easgd.runtime.parts import RunParts
from easgd.runtime.resume import checkpoint_dir, checkpoint_signature, resume_server
from easgd.runtime.runlog import RunLog
from easgd.runtime.server import ParameterServer, StopRule
from easgd.runtime.snapshot import SnapshotCut, SnapshotLog, SnapshotWriter
from easgd.runtime.summary import hparams_of, server_summary, write_summary

log = logging.getLogger("easgd")


def evaluate_center(flat: FlatModel, split: Split, point: Tensor) -> dict[str, float]:
    """Test loss and error of ``point``, with BatchNorm statistics recomputed for it first."""
    flat.recompute_running_stats(point, split.train_x)
    return flat.evaluate(point, split.test_x, split.test_y)


def run_server(cfg: TrainConfig, env: DistEnv, split: Split, pairs: PairGroups) -> dict[str, Any]:
    """Rank 0: hold the center, serve the workers, evaluate, snapshot, write the run directory."""
    flat = evaluator_for(cfg, split)
    role = make_server_role(cfg.algorithm, flat.initial_point(), num_workers=cfg.workers)
    signature = checkpoint_signature(cfg, flat.num_params)
    server_files = Checkpointer(checkpoint_dir(cfg), "server", keep=cfg.checkpoint.keep)
    state = resume_server(server_files, cfg, signature)
    restarts, exchanges_before, finished_before = 0, 0, set()
    if state is not None:
        role.load_state_dict(state["role"])
        restarts, exchanges_before = int(state["restarts"]) + 1, int(state["exchanges"])
        finished_before = {int(r) for r in state["finished"]}
    transports = {
        rank: transport_for(cfg, rank, group, flat.num_params, SERVER_RANK)
        for rank, group in pairs.groups.items()
    }
    runlog = RunLog(cfg.run_dir, tensorboard=cfg.tensorboard)
    log.info(
        "%s with %d workers, tau=%d, %d parameters; run directory %s",
        cfg.algorithm.name,
        cfg.workers,
        cfg.comm.period,
        flat.num_params,
        os.path.abspath(cfg.run_dir),
    )
    cut = SnapshotCut(next_number=SnapshotLog(checkpoint_dir(cfg)).next_number())
    server = ParameterServer(
        role,
        transports,
        evaluate=lambda point: evaluate_center(flat, split, point),
        runlog=runlog,
        stop_rule=StopRule(max_wall_s=cfg.max_wall_s, target_test_error=cfg.target_test_error),
        eval_interval_s=cfg.eval_interval_s,
        total_steps=cfg.workers * cfg.steps_per_worker,
        continue_on_failure=cfg.worker_failure == "continue",
        progress=cfg.progress,
        exchanges_before=exchanges_before,
        heartbeat=HeartbeatMonitor(
            pairs.store, timeout_s=cfg.comm.heartbeat_timeout_s, first_step_s=cfg.comm.timeout_s
        ),
        max_update_norm=cfg.max_update_norm,
        snapshots=cut,
        finished_before=finished_before,
    )
    snapshots = SnapshotWriter(
        cut,
        server,
        checkpoint_dir(cfg),
        every_s=cfg.checkpoint.every_s,
        names=["server", *(f"worker{r}" for r in transports)],
        keep=cfg.checkpoint.keep,
        extra={"restarts": restarts, "signature": signature},
    )
    faults = FaultInjector(cfg.fault, SERVER_RANK, generation=pairs.generation)
    faults.wrap_server_role(role)

    def on_tick() -> None:
        snapshots.tick()
        faults.server_tick(role.updates)  # after any snapshot that was due at this tick

    server.on_tick = on_tick
    for transport in transports.values():  # liveness is the heartbeat's call, not a deadline's
        transport.recv_timeout_s = 7 * 24 * 3600.0
    try:
        outcome = server.run()
        snapshots.finish()
        summary = server_summary(
            cfg,
            outcome,
            server,
            num_params=flat.num_params,
            restarts=restarts,
            committed_snapshot=snapshots.committed,
        )
        return write_summary(runlog, summary, hparams_of(cfg))
    finally:
        runlog.close()


def run_server_topology(cfg: TrainConfig) -> dict[str, Any] | None:
    """This process's part of a parameter-server run: rank 0 serves (and returns the summary),
    ranks 1..p work."""
    from easgd.runtime.process import role_name, setup_logging
    from easgd.runtime.worker_main import run_worker

    env = DistEnv.from_environ()
    check_world(env, expected_world_size=cfg.world_size, workers=cfg.workers)
    setup_logging(role_name(env.rank))
    parts = RunParts.load(cfg)
    pairs = init_pair_groups(
        env, backend=choose_backend(cfg.comm.backend), timeout_s=cfg.comm.timeout_s
    )
    try:
        if env.rank == SERVER_RANK:
            return run_server(cfg, env, parts.split, pairs)
        run_worker(cfg, env, parts.split, pairs)
        return None
    finally:
        shutdown()
