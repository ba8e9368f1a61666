"""Rank 0's part of a run: build the server role, resume, serve, checkpoint, summarise."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from easgd.comm.groups import SERVER_RANK, DistEnv, PairGroups
from easgd.comm.heartbeat import HeartbeatMonitor
from easgd.config.schema import TrainConfig
from easgd.data.split import Split
from easgd.roles import make_server_role
from easgd.runtime.checkpoint import Checkpointer
from easgd.runtime.components import evaluator_for, transport_for
from easgd.runtime.faults import kill_self
from easgd.runtime.resume import checkpoint_signature, read_progress, resume_state, write_progress
from easgd.runtime.runlog import RunLog
from easgd.runtime.server import ParameterServer, StopRule
from easgd.runtime.summary import build_summary, finish_run

log = logging.getLogger("easgd")


def run_server(cfg: TrainConfig, env: DistEnv, split: Split, pairs: PairGroups) -> dict[str, Any]:
    """Rank 0: hold the center, serve the workers, evaluate, checkpoint, write the run directory."""
    flat = evaluator_for(cfg, split)
    role = make_server_role(cfg.algorithm, flat.initial_point(), num_workers=cfg.workers)
    signature = checkpoint_signature(cfg, flat.num_params)
    checkpointer = Checkpointer(
        Path(cfg.run_dir) / "checkpoints", "server", keep=cfg.checkpoint.keep
    )
    state = resume_state(checkpointer, cfg, signature)
    restarts, exchanges_before, steps_before_crash = 0, 0, {}
    if state is not None:
        role.load_state_dict(state["role"])
        restarts, exchanges_before = int(state["restarts"]) + 1, int(state["exchanges"])
        steps_before_crash = read_progress(cfg)
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
    server = ParameterServer(
        role,
        transports,
        evaluate=lambda point: flat.evaluate(point, split.test_x, split.test_y),
        runlog=runlog,
        stop_rule=StopRule(max_wall_s=cfg.max_wall_s, target_test_error=cfg.target_test_error),
        eval_interval_s=cfg.eval_interval_s,
        total_steps=cfg.workers * cfg.steps_per_worker,
        continue_on_failure=cfg.worker_failure == "continue",
        progress=cfg.progress,
        exchanges_before=exchanges_before,
        heartbeat=HeartbeatMonitor(
            pairs.store, list(pairs.groups), timeout_s=cfg.comm.heartbeat_timeout_s
        ),
        max_update_norm=cfg.max_update_norm,
    )

    def record_progress() -> None:
        write_progress(cfg, {r: s.steps for r, s in server.stats.items()})

    def save() -> None:
        with server.lock:
            snapshot = {
                "role": role.state_dict(),
                "exchanges": server.exchanges,
                "restarts": restarts,
                "signature": signature,
            }
        checkpointer.save(snapshot)

    last_save = time.perf_counter()

    def on_tick() -> None:
        nonlocal last_save
        record_progress()
        if cfg.checkpoint.every_s and time.perf_counter() - last_save >= cfg.checkpoint.every_s:
            save()
            last_save = time.perf_counter()
        # failure injection fires at a tick, after any checkpoint that was due there
        fault = cfg.fault
        if (
            fault.kill_rank == SERVER_RANK
            and env.restart_count == 0
            and role.updates >= fault.kill_at_step
        ):
            kill_self("server", role.updates)

    server.on_tick = on_tick
    try:
        try:
            outcome = server.run()
        finally:
            # also when a worker failed: the center is intact, and a restart resumes from here
            record_progress()
            save()
        redone = sum(
            max(0, steps_before_crash.get(r, 0) - s) for r, s in server.resumed_steps.items()
        )
        summary = build_summary(
            cfg,
            num_params=flat.num_params,
            wall_time_s=outcome.wall_time_s,
            exchanges=outcome.exchanges,
            server_updates=outcome.server_updates,
            worker_steps=outcome.worker_steps,
            test_loss=outcome.test_loss,
            test_error=outcome.test_error,
            stop_reason=outcome.stop_reason,
            extra={
                "rejected_messages": outcome.rejected,
                "failed_workers": {str(r): why for r, why in outcome.failed_workers.items()},
                "restarts": restarts,
                "resumed_worker_steps": {str(r): s for r, s in server.resumed_steps.items()},
                "redone_worker_steps": redone,
                "worker_steps_per_s": {str(r): s.steps_per_s for r, s in server.stats.items()},
            },
        )
        path = finish_run(runlog, cfg, summary)
    finally:
        runlog.close()
    log.info(
        "done in %.1f s: center test error %.2f%%, %d exchanges (%.0f/s); summary in %s",
        summary["wall_time_s"],
        100 * summary["test_error"],
        summary["exchanges"],
        summary["exchanges_per_s"],
        path,
    )
    return summary
