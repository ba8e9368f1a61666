"""Rank 0's part of a run: build the server role, resume, serve, snapshot, summarise."""

from __future__ import annotations

import logging
import os
from typing import Any

from torch import Tensor
from torch.distributed import Store

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
from easgd.engine.server import ParameterServer, Resumed, ServePolicy
from easgd.engine.supervisor import Evaluate, ServerOutcome, Supervision, Supervisor
from easgd.flat import FlatModel
from easgd.parts.assembly import RunParts, RunRecord
from easgd.parts.build import transport_for
from easgd.parts.summary import Summary, hparams_of, write_summary
from easgd.recovery.checkpoint import Checkpointer
from easgd.recovery.resume import checkpoint_dir, checkpoint_signature, resume_server
from easgd.recovery.snapshot import SnapshotCut, SnapshotLog, SnapshotWriter
from easgd.roles import ServerRole, make_server_role

log = logging.getLogger("easgd")


def evaluate_center(flat: FlatModel, split: Split, point: Tensor) -> dict[str, float]:
    """Test loss and error of ``point``, with BatchNorm statistics recomputed for it first."""
    flat.recompute_running_stats(point, split.train_x)
    return flat.evaluate(point, split.test_x, split.test_y)


def resumed_from(role: ServerRole, state: dict[str, Any] | None) -> tuple[int, Resumed]:
    """Load the server's (or a shard's) part of the snapshot resumed from, if any, into ``role``:
    (restarts so far, where serving resumes)."""
    if state is None:
        return 0, Resumed()
    role.load_state_dict(state["role"])
    finished = frozenset(int(r) for r in state["finished"])
    steps = {int(r): int(s) for r, s in state.get("steps", {}).items()}
    return int(state["restarts"]) + 1, Resumed(int(state["exchanges"]), finished, steps)


def serve_policy(cfg: TrainConfig) -> ServePolicy:
    """How a parameter-server run treats failing workers and bad updates."""
    continue_on_failure = cfg.worker_failure == "continue"
    return ServePolicy(continue_on_failure, max_update_norm=cfg.max_update_norm)


def supervise(
    record: RunRecord, server: ParameterServer, evaluate: Evaluate, store: Store
) -> Supervisor:
    """The supervisor of a parameter-server run (one server, or a shard) on the run's record:
    its run log, stop rule and evaluation interval; the lead shows the progress bar."""
    cfg = record.cfg
    settings = Supervision(
        eval_interval_s=record.cadence.interval_s,
        eval_interval_steps=record.cadence.interval_steps,
        stop_rule=record.stop_rule,
        total_steps=cfg.workers * cfg.steps_per_worker,
        progress=cfg.progress and record.lead,
        steps_per_worker=cfg.steps_per_worker,
    )
    heartbeat = HeartbeatMonitor(
        store, timeout_s=cfg.comm.heartbeat_timeout_s, first_step_s=cfg.comm.timeout_s
    )
    return Supervisor(server, evaluate, record.runlog, settings, heartbeat=heartbeat)


def run_server(parts: RunParts, pairs: PairGroups) -> dict[str, Any]:
    """Rank 0: hold the center, serve the workers, evaluate, snapshot, write the run directory."""
    cfg, split = parts.cfg, parts.split
    flat = parts.flat_model()  # on the CPU: the center and its evaluation
    role = make_server_role(cfg.algorithm, flat.initial_point(), num_workers=cfg.workers)
    signature = checkpoint_signature(cfg, flat.num_params)
    server_files = Checkpointer(checkpoint_dir(cfg), "server", keep=cfg.checkpoint.keep)
    restarts, resumed = resumed_from(role, resume_server(server_files, cfg, signature))
    transports = {
        rank: transport_for(cfg, rank, group, flat.num_params, SERVER_RANK)
        for rank, group in pairs.groups.items()
    }
    record = parts.record(lead=True, progress=False)  # the supervisor shows the bar
    runlog = record.runlog
    log.info(
        "%s with %d workers, tau=%d, %d parameters; run directory %s",
        cfg.algorithm.name,
        cfg.workers,
        cfg.comm.period,
        flat.num_params,
        os.path.abspath(cfg.run_dir),
    )
    cut = SnapshotCut(next_number=SnapshotLog(checkpoint_dir(cfg)).next_number())
    server = ParameterServer(role, transports, serve_policy(cfg), resumed=resumed, snapshots=cut)
    evaluate = lambda point: evaluate_center(flat, split, point)  # noqa: E731
    supervisor = supervise(record, server, evaluate, pairs.store)
    snapshots = SnapshotWriter(
        cut,
        supervisor,
        checkpoint_dir(cfg),
        every_s=cfg.checkpoint.every_s,
        names=["server", *(f"worker{r}" for r in transports)],
        keep=cfg.checkpoint.keep,
        extra={"restarts": restarts, "signature": signature},
    )
    faults = parts.faults(SERVER_RANK, generation=pairs.generation)
    faults.watch_server(server)
    supervisor.on_tick.append(snapshots.tick)
    # the kill fires after any snapshot that was due at this tick
    supervisor.on_tick.append(lambda: faults.server_tick(role.updates))
    for transport in transports.values():  # liveness is the heartbeat's call, not a deadline's
        transport.recv_timeout_s = 7 * 24 * 3600.0
    try:
        outcome = supervisor.run()
        snapshots.finish()
        committed = snapshots.committed
        return record_server_run(record, outcome, server, committed, restarts, flat.num_params)
    finally:
        runlog.close()


def run_server_topology(cfg: TrainConfig) -> dict[str, Any] | None:
    """This process's part of a parameter-server run: rank 0 serves (and returns the summary),
    ranks 1..p work."""
    from easgd.topologies.registry import role_name, setup_logging
    from easgd.topologies.worker import run_worker

    env = DistEnv.from_environ()
    check_world(env, expected_world_size=cfg.world_size, workers=cfg.workers)
    setup_logging(role_name(env.rank))
    parts = RunParts.load(cfg)
    pairs = init_pair_groups(
        env, backend=choose_backend(cfg.comm.backend), timeout_s=cfg.comm.timeout_s
    )
    try:
        if env.rank == SERVER_RANK:
            return run_server(parts, pairs)
        run_worker(parts, env, pairs)
        return None
    finally:
        shutdown()


def record_server_run(
    record: RunRecord,
    outcome: ServerOutcome,
    server: ParameterServer,
    committed: int | None,
    restarts: int,
    num_params: int,
    *,
    membership: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write summary.json (and the HParams entry) of a parameter-server run, one server or shard
    0 of a sharded center, whose final committed snapshot is ``committed``; returns it."""
    cfg = record.cfg
    summary = Summary.of_run(
        cfg,
        outcome.figures(),
        topology="server",
        num_params=num_params,
        restarts=restarts,
        resumed_worker_steps={str(r): s for r, s in server.resumed_steps.items()},
        resumed_exchanges=server.resumed_exchanges,
        failed_workers={str(r): why for r, why in outcome.failed_workers.items()},
        details={
            "shards": cfg.server.shards,
            "rejected_messages": outcome.rejected,
            "worker_steps_per_s": {str(r): s.steps_per_s for r, s in server.stats.items()},
            "redone_worker_steps": sum(s.redone_steps for s in server.stats.values()),
            "redone_steps_by_worker": {str(r): s.redone_steps for r, s in server.stats.items()},
            "committed_snapshot": committed,
            "membership": membership if membership is not None else {"mode": "fixed"},
        },
    )
    return write_summary(record.runlog, summary, hparams_of(cfg))
