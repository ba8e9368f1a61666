"""A run whose center lives on k shard ranks (``server.shards=k``, k > 1).

    # 4 workers, 2 shards: ranks 0-1 hold the two halves of the center, ranks 2-5 are workers
    torchrun --standalone --nproc_per_node=6 -m easgd.train server.shards=2 workers=4

Shard j serves with :class:`~easgd.engine.server.ParameterServer` and the algorithm's own server
role built on its contiguous slice of the center (every server rule is elementwise: see
:mod:`easgd.roles.sharded`), serving every worker's exchange of that slice; workers reach all
shards in parallel through :class:`easgd.comm.sharded.ShardedTransport`. Snapshots are consistent
across shards and workers (:mod:`easgd.recovery.sharded_snapshot`: each shard writes its slice as
``shard{j}-<n>.pt``, shard 0 commits) and a restarted job resumes every rank from the newest
committed one; shard 0 evaluates the whole center (pulling the other slices), applies the stop
rules and writes summary.json, metrics.csv and TensorBoard files.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from dataclasses import replace
from typing import Any

import torch

from easgd.comm.groups import DistEnv, LaunchError, PairGroups, choose_backend, shutdown
from easgd.comm.sharded import ShardGroups, SliceGather, init_shard_groups, serve_slices
from easgd.config.schema import TrainConfig
from easgd.engine.server import ParameterServer
from easgd.engine.supervisor import Evaluate, ServerOutcome, Supervisor
from easgd.flat import FlatModel
from easgd.parts.assembly import RunParts, RunRecord
from easgd.parts.build import transport_for
from easgd.recovery.checkpoint import Checkpointer
from easgd.recovery.resume import checkpoint_dir, checkpoint_signature, resume_server
from easgd.recovery.sharded_snapshot import BarrierCut, ShardPeers
from easgd.recovery.snapshot import SnapshotLog, SnapshotWriter
from easgd.roles import make_server_role
from easgd.roles.sharded import shard_bounds
from easgd.topologies.registry import setup_logging
from easgd.topologies.server import record_server_run, resumed_from, serve_policy, supervise
from easgd.topologies.worker import run_worker

log = logging.getLogger("easgd")


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
    setup_logging(f"shard{env.rank}" if env.rank < shards else f"worker{env.rank}")
    parts = RunParts.load(cfg)
    backend = choose_backend(cfg.comm.backend)
    groups = init_shard_groups(env, shards=shards, backend=backend, timeout_s=cfg.comm.timeout_s)
    try:
        if env.rank < shards:
            return run_shard(parts, env, groups)
        run_worker(parts, env, PairGroups(groups.shards, groups.store, groups.generation))
        return None
    finally:
        shutdown()


def run_shard(parts: RunParts, env: DistEnv, groups: ShardGroups) -> dict[str, Any] | None:
    """Shard ``env.rank``: serve its slice of the center; shard 0 also evaluates and records."""
    cfg = parts.cfg
    shard, lead = env.rank, env.rank == 0
    flat = parts.flat_model()  # on the CPU: the center's slice, and shard 0's evaluation
    bounds = shard_bounds(flat.num_params, cfg.server.shards)
    lo, hi = bounds[shard]
    center = flat.initial_point()[lo:hi].clone()
    role = make_server_role(cfg.algorithm, center, num_workers=cfg.workers)
    shape = {"shards": cfg.server.shards, "slice": [lo, hi]}
    signature = {**checkpoint_signature(cfg, flat.num_params), **shape}
    directory = checkpoint_dir(cfg)
    state = resume_server(Checkpointer(directory, f"shard{shard}"), cfg, signature)
    restarts, resumed = resumed_from(role, state)
    transports = {
        worker: transport_for(cfg, worker, group, hi - lo, shard)
        for worker, group in groups.workers.items()
    }
    cut = BarrierCut(lead=lead, next_number=SnapshotLog(directory).next_number())
    # no norm limit: a shard sees part of an update (the schema refuses the key with shards)
    policy = replace(serve_policy(cfg), max_update_norm=None)
    server = ParameterServer(role, transports, policy, resumed=resumed, snapshots=cut)
    gather = _gather(groups, bounds, server) if lead else None
    evaluate, record = _record(parts, flat, gather)
    runlog = record.runlog
    supervisor = supervise(record, server, evaluate, groups.store)
    snapshots = SnapshotWriter(
        cut,
        supervisor,
        directory,
        every_s=cfg.checkpoint.every_s,
        names=[f"shard{j}" for j in range(cfg.server.shards)] + [f"worker{r}" for r in transports],
        name=f"shard{shard}",
        keep=cfg.checkpoint.keep,
        extra={"restarts": restarts, "signature": signature},
        peers=ShardPeers(
            groups.store, shard=shard, shards=cfg.server.shards, timeout_s=cfg.comm.timeout_s
        ),
    )
    faults = parts.faults(shard, generation=groups.generation, who=f"shard {shard}")
    supervisor.on_tick.append(snapshots.tick)
    supervisor.on_tick.append(lambda: faults.server_tick(role.updates))
    try:
        outcome = _serve_shard(supervisor, snapshots, groups, gather, timeout_s=cfg.comm.timeout_s)
        if outcome is None:
            return None
        committed = snapshots.committed
        return record_server_run(record, outcome, server, committed, restarts, flat.num_params)
    finally:
        runlog.close()


def _gather(
    groups: ShardGroups, bounds: list[tuple[int, int]], server: ParameterServer
) -> SliceGather:
    """Lead shard: pulls the other shards' slices to evaluate the whole center."""
    return SliceGather(
        groups.shards,
        bounds,
        final=lambda: all(s.finished or s.failed for s in server.stats.values()),
    )


def _record(
    parts: RunParts, flat: FlatModel, gather: SliceGather | None
) -> tuple[Evaluate, RunRecord]:
    """How this shard evaluates and where it records: the lead the whole center into the run
    directory, the others nothing."""
    cfg, split = parts.cfg, parts.split
    record = parts.record(lead=gather is not None, progress=False)  # the supervisor shows the bar
    if gather is None:
        return lambda own: {"test_loss": math.nan, "test_error": math.nan}, record
    log.info(
        "%s with %d workers and %d shards, tau=%d, %d parameters; run directory %s",
        cfg.algorithm.name,
        cfg.workers,
        cfg.server.shards,
        cfg.comm.period,
        flat.num_params,
        os.path.abspath(cfg.run_dir),
    )
    evaluate = lambda own: flat.evaluate(gather(own), split.test_x, split.test_y)  # noqa: E731
    return evaluate, record


def _serve_shard(
    supervisor: Supervisor,
    snapshots: SnapshotWriter,
    groups: ShardGroups,
    gather: SliceGather | None,
    *,
    timeout_s: float,
) -> ServerOutcome | None:
    """Run the shard to its end and write its final snapshot part; the lead's outcome (else None)."""
    server, server_done = supervisor.server, threading.Event()

    def own_slice() -> torch.Tensor:
        with server.lock:
            return server.role.evaluated().clone()

    slices_thread = (
        None if gather is not None else serve_slices(groups.shards[0], own_slice, server_done)
    )
    try:
        outcome = supervisor.run()
    except BaseException:
        snapshots.fail()
        raise
    finally:
        server_done.set()
        if gather is not None:
            gather.release(server.role.center.dtype)
    snapshots.finish()
    if slices_thread is not None:
        slices_thread.join(timeout=timeout_s)
        return None
    return outcome
