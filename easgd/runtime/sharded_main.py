"""A run whose center lives on k shard ranks (``server.shards=k``, k > 1).

    # 4 workers, 2 shards: ranks 0-1 hold the two halves of the center, ranks 2-5 are workers
    torchrun --standalone --nproc_per_node=6 -m easgd.train server.shards=2 workers=4

Shard j runs the unchanged :class:`ParameterServer` with the algorithm's own server role built on
its contiguous slice of the center (every server rule is elementwise: see
:mod:`easgd.roles.sharded`), serving every worker's exchange of that slice; workers reach all
shards in parallel through :class:`easgd.comm.sharded.ShardedTransport`. Each shard checkpoints
its slice (``shard{j}-*.pt``) and resumes it; shard 0 evaluates the whole center (pulling the
other slices), applies the stop rules and writes summary.json, metrics.csv and TensorBoard files.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import torch

from easgd.comm.groups import DistEnv, LaunchError, PairGroups, choose_backend, shutdown
from easgd.comm.heartbeat import HeartbeatMonitor
from easgd.comm.sharded import ShardGroups, SliceGather, init_shard_groups, serve_slices
from easgd.config.schema import TrainConfig
from easgd.data.split import Split
from easgd.roles import make_server_role
from easgd.roles.sharded import shard_bounds
from easgd.runtime.checkpoint import Checkpointer, check_compatible
from easgd.runtime.components import build_split, evaluator_for, transport_for
from easgd.runtime.faults import kill_self
from easgd.runtime.resume import checkpoint_signature
from easgd.runtime.runlog import RunLog
from easgd.runtime.server import Evaluate, ParameterServer, StopRule
from easgd.runtime.summary import finish_run, log_done, server_summary
from easgd.runtime.worker_main import run_worker

log = logging.getLogger("easgd")


class _NoRunLog(RunLog):
    """Shards j > 0 write nothing: shard 0 records the run."""

    def __init__(self) -> None:
        self._writer = None

    def scalar(self, tag: str, value: float, step: int, *, walltime: float | None = None) -> None:
        pass

    def evaluation(self, **_: Any) -> None:
        pass

    def close(self) -> None:
        pass


def run_sharded(cfg: TrainConfig) -> dict[str, Any] | None:
    """This process's part of a sharded run; shard 0 returns the summary."""
    env = DistEnv.from_environ()
    shards = cfg.server.shards
    if env.world_size != cfg.world_size:
        raise LaunchError(
            f"world size is {env.world_size} but workers={cfg.workers} with server.shards={shards} "
            f"needs {cfg.world_size} processes (ranks 0..{shards - 1} are the shards); use "
            f"torchrun --nproc_per_node={cfg.world_size}"
        )
    torch.set_num_threads(cfg.threads)
    name = f"shard{env.rank}" if env.rank < shards else f"worker{env.rank}"
    logging.basicConfig(
        level=os.environ.get("EASGD_LOG_LEVEL", "INFO"),
        format=f"[{name}] %(levelname)s %(message)s",
        force=True,
    )
    split = build_split(cfg.data)
    backend = choose_backend(cfg.comm.backend)
    groups = init_shard_groups(env, shards=shards, backend=backend, timeout_s=cfg.comm.timeout_s)
    try:
        if env.rank < shards:
            return run_shard(cfg, env, split, groups)
        run_worker(cfg, env, split, PairGroups(groups.shards, groups.store))
        return None
    finally:
        shutdown()


def _resume_slice(
    checkpointer: Checkpointer, cfg: TrainConfig, signature: dict[str, Any]
) -> dict[str, Any] | None:
    """This shard's newest intact, compatible slice checkpoint (None: start fresh).

    Sharded runs have no consistent cut across shards and workers (the marker-based snapshots of
    :mod:`easgd.runtime.snapshot` serve one server): each shard resumes its own newest slice and
    the workers of a restarted job start again from the center.
    """
    if not cfg.checkpoint.resume:
        return None
    found = checkpointer.latest()
    if found is None:
        return None
    path, state = found
    check_compatible(state, path=path, signature=signature)
    log.info("resuming this shard's slice from %s", path)
    return state


def run_shard(
    cfg: TrainConfig, env: DistEnv, split: Split, groups: ShardGroups
) -> dict[str, Any] | None:
    """Shard ``env.rank``: serve its slice of the center; shard 0 also evaluates and records."""
    shard, lead = env.rank, env.rank == 0
    flat = evaluator_for(cfg, split)
    bounds = shard_bounds(flat.num_params, cfg.server.shards)
    lo, hi = bounds[shard]
    role = make_server_role(
        cfg.algorithm, flat.initial_point()[lo:hi].clone(), num_workers=cfg.workers
    )
    signature = {
        **checkpoint_signature(cfg, flat.num_params),
        "shards": cfg.server.shards,
        "slice": [lo, hi],
    }
    checkpointer = Checkpointer(
        Path(cfg.run_dir) / "checkpoints", f"shard{shard}", keep=cfg.checkpoint.keep
    )
    state = _resume_slice(checkpointer, cfg, signature)
    restarts, exchanges_before = 0, 0
    if state is not None:
        role.load_state_dict(state["role"])
        restarts, exchanges_before = int(state["restarts"]) + 1, int(state["exchanges"])
    transports = {
        worker: transport_for(cfg, worker, group, hi - lo, shard)
        for worker, group in groups.workers.items()
    }
    server_done = threading.Event()
    gather: SliceGather | None = None
    evaluate: Evaluate
    if lead:
        gather = SliceGather(
            groups.shards,
            bounds,
            final=lambda: all(s.finished or s.failed for s in server.stats.values()),
        )
        whole = gather
        evaluate = lambda own: flat.evaluate(whole(own), split.test_x, split.test_y)  # noqa: E731
        runlog = RunLog(cfg.run_dir, tensorboard=cfg.tensorboard)
        log.info(
            "%s with %d workers and %d shards, tau=%d, %d parameters; run directory %s",
            cfg.algorithm.name,
            cfg.workers,
            cfg.server.shards,
            cfg.comm.period,
            flat.num_params,
            os.path.abspath(cfg.run_dir),
        )
    else:
        evaluate = lambda own: {"test_loss": math.nan, "test_error": math.nan}  # noqa: E731
        runlog = _NoRunLog()
    server = ParameterServer(
        role,
        transports,
        evaluate=evaluate,
        runlog=runlog,
        stop_rule=StopRule(max_wall_s=cfg.max_wall_s, target_test_error=cfg.target_test_error),
        eval_interval_s=cfg.eval_interval_s,
        total_steps=cfg.workers * cfg.steps_per_worker,
        continue_on_failure=cfg.worker_failure == "continue",
        progress=cfg.progress and lead,
        exchanges_before=exchanges_before,
        heartbeat=HeartbeatMonitor(
            groups.store, timeout_s=cfg.comm.heartbeat_timeout_s, first_step_s=cfg.comm.timeout_s
        ),
        max_update_norm=None,  # a shard sees part of an update (schema refuses the key)
    )

    def snapshot() -> torch.Tensor:
        with server.lock:
            return role.evaluated().clone()

    slices_thread = None if lead else serve_slices(groups.shards[0], snapshot, server_done)

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
        if cfg.checkpoint.every_s and time.perf_counter() - last_save >= cfg.checkpoint.every_s:
            save()
            last_save = time.perf_counter()
        fault = cfg.fault
        if (
            fault.kill_rank == shard
            and env.restart_count == 0
            and role.updates >= fault.kill_at_step
        ):
            kill_self(f"shard {shard}", role.updates)

    server.on_tick = on_tick
    try:
        try:
            outcome = server.run()
        finally:
            save()
            server_done.set()
            if gather is not None:
                gather.release(role.center.dtype)
        if slices_thread is not None:
            slices_thread.join(timeout=cfg.comm.timeout_s)
            return None
        summary = server_summary(
            cfg,
            outcome,
            server,
            num_params=flat.num_params,
            restarts=restarts,
            extra={
                "topology": "server",
                "shards": cfg.server.shards,
            },
        )
        path = finish_run(runlog, cfg, summary)
    finally:
        runlog.close()
    log_done(summary, path)
    return summary
