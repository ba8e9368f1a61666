"""The ``topology=allreduce`` process: p ranks, every one a worker, no server.

    # 4 workers, no server process: world size = workers
    torchrun --standalone --nproc_per_node=4 -m easgd.train topology=allreduce workers=4
    python -m easgd.train topology=allreduce workers=4        # the same, self-launched

Each rank runs :class:`~easgd.engine.allreduce.ReplicatedCenterLoop` (the replicated center, the
exchange and the control slots). Rank 0 also leads: it evaluates x~ between exchanges (the others
wait for it at the next all-reduce), applies the stop rules, times the snapshots and writes
summary.json, metrics.csv and TensorBoard files like the server topology. Each rank saves its
part of a snapshot at the same step, and a snapshot is committed in the run's snapshot log once
every part is on disk (:mod:`.allreduce_snapshots`); a restarted job resumes every rank from the
newest committed snapshot.

This module declares only what is the topology's own (every rank a worker, the all-reduce
exchange, rank 0's lead duties); data, model, sampler, signature, faults, run log, stop rules,
evaluation cadence and summary are the shared parts of :mod:`easgd.parts.assembly`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from easgd.comm.allreduce import AllReduceSum, allreduce_backend, init_world
from easgd.comm.groups import DistEnv, LaunchError, shutdown
from easgd.comm.transport import Delay
from easgd.config.schema import TrainConfig
from easgd.data.sampling import MinibatchSampler
from easgd.engine.allreduce import (
    ExchangeReport,
    LoopOutcome,
    ReplicatedCenterLoop,
    control_slots,
    rank_worker,
    sampled_gradient,
)
from easgd.flat import FlatModel
from easgd.parts.assembly import RunParts, RunRecord
from easgd.parts.summary import RunFigures, Summary
from easgd.recovery.allreduce_snapshots import RankSnapshots
from easgd.recovery.resume import checkpoint_dir
from easgd.roles import ElasticWorker
from easgd.topologies.registry import setup_logging

log = logging.getLogger("easgd")


# -- the process ------------------------------------------------------------------------------
def run_allreduce(cfg: TrainConfig) -> dict[str, Any] | None:
    """This process's part of a ``topology=allreduce`` run; rank 0 returns the summary."""
    env = DistEnv.from_environ()
    if env.world_size != cfg.workers:
        raise LaunchError(
            f"world size is {env.world_size} but topology=allreduce with workers={cfg.workers} "
            f"needs {cfg.workers} processes (no server rank); use torchrun "
            f"--nproc_per_node={cfg.workers}, or set workers={env.world_size}"
        )
    setup_logging(f"rank{env.rank}")
    parts = RunParts.load(cfg)
    device = parts.device(env.local_rank)
    _, generation = init_world(env, backend=allreduce_backend(device), timeout_s=cfg.comm.timeout_s)
    try:
        return _run_rank(parts, env, device, generation=generation)
    finally:
        shutdown()


@dataclass
class _Start:
    """Where this attempt starts: the center, and the counters of the snapshot it resumes."""

    center: Tensor
    restarts: int = 0
    rounds: int = 0


def _resume(
    snapshots: RankSnapshots,
    role: ElasticWorker,
    sampler: MinibatchSampler,
    flat: FlatModel,
    signature: dict[str, Any],
    *,
    enabled: bool,
) -> _Start:
    """Load this rank's part of the newest committed snapshot into ``role`` and ``sampler``
    (``enabled``: ``checkpoint.resume``)."""
    state = snapshots.resume(signature) if enabled else None
    if state is None:
        return _Start(flat.initial_point())
    device = flat.flat_params.device
    role.load_state_dict(
        {k: v.to(device) if isinstance(v, Tensor) else v for k, v in state["role"].items()}
    )
    sampler.generator.set_state(state["rng"])
    return _Start(state["center"].to(device), int(state["restarts"]) + 1, int(state["rounds"]))


def _run_rank(
    parts: RunParts, env: DistEnv, device: torch.device, *, generation: int
) -> dict[str, Any] | None:
    cfg, rank, p = parts.cfg, env.rank, parts.cfg.workers
    flat = parts.flat_model(device)
    sampler = parts.sampler(rank, device=device)
    role = rank_worker(cfg.algorithm, flat, comm_period=cfg.comm.period)
    role.set_local_step(
        schedule=cfg.optim.schedule(cfg.steps_per_worker), max_grad_norm=cfg.optim.clip_grad_norm
    )
    signature = parts.signature(flat.num_params, topology="allreduce")
    snapshots = RankSnapshots(
        checkpoint_dir(cfg), rank, num_workers=p, keep=cfg.checkpoint.keep, device=device
    )
    start = _resume(snapshots, role, sampler, flat, signature, enabled=cfg.checkpoint.resume)
    resumed_step = role.step
    faults = parts.faults(rank, generation=generation, who=f"rank {rank}")
    lead = _Lead(parts, flat.num_params, resumed_step, start.rounds) if rank == 0 else None
    loop = ReplicatedCenterLoop(
        role,
        start.center,
        AllReduceSum(
            numel=flat.num_params,
            control_slots=control_slots(p),
            device=device,
            delay=Delay(cfg.comm.latency_ms, cfg.comm.jitter_ms),
            seed=cfg.seed * 7919 + rank,
        ),
        sampled_gradient(flat, sampler),
        rank=rank,
        num_workers=p,
        moving_rate=cfg.algorithm.resolved_moving_rate(p),
        steps=cfg.steps_per_worker,
        rounds_before=start.rounds,
        slowdown=parts.slowdown(rank),
        measure_distance=cfg.tensorboard,
        decide=lead.decide if lead is not None else None,
        snapshots=snapshots,
        after_exchange=lead.after_exchange if lead is not None else None,
        after_step=lambda role: faults.worker_step(role.step, role.params),
    )
    snapshots.capture = lambda: {
        "role": loop.role.state_dict(),
        "center": loop.center,
        "rng": sampler.generator.get_state(),
        "rounds": loop.rounds,
        "restarts": start.restarts,
        "signature": signature,
    }
    if lead is None:
        loop.run()
        snapshots.finish()
        return None
    return lead.run(loop, snapshots, restarts=start.restarts, resumed_step=resumed_step)


class _Lead:
    """Rank 0's extra duties: evaluate x~, apply the stop rules, time snapshots, keep the record."""

    def __init__(self, parts: RunParts, num_params: int, resumed_step: int, rounds: int) -> None:
        self.cfg = parts.cfg
        self.split = parts.split
        self.num_params = num_params
        self.evaluator = parts.flat_model()  # on the CPU
        self.record: RunRecord = parts.record(lead=True)
        p = self.cfg.workers
        self.record.progress.advance(p * resumed_step, exchanges=p * rounds)
        self._loop: ReplicatedCenterLoop | None = None
        self._last_step = resumed_step
        self._last_save = time.perf_counter()

    def run(
        self,
        loop: ReplicatedCenterLoop,
        snapshots: RankSnapshots,
        *,
        restarts: int,
        resumed_step: int,
    ) -> dict[str, Any]:
        """Run rank 0's loop with the lead's duties; returns the summary written."""
        try:
            self._start(loop)
            outcome = loop.run()
            snapshots.finish()
            final = self.evaluate(final=True)
        except BaseException:
            self.record.close()
            raise
        return self.record.finish(self._summary(outcome, final, restarts, resumed_step))

    def _start(self, loop: ReplicatedCenterLoop) -> None:
        self._loop = loop
        self.record.start()
        self._last_save = time.perf_counter()
        log.info(
            "%s over all-reduce with %d workers, tau=%d, %d parameters; run directory %s",
            self.cfg.algorithm.name,
            self.cfg.workers,
            self.cfg.comm.period,
            self.num_params,
            os.path.abspath(self.cfg.run_dir),
        )
        self.evaluate()

    def evaluate(self, *, final: bool = False) -> dict[str, float]:
        """Evaluate x~ and record it (``final``: the last record, with no stop rule applied)."""
        assert self._loop is not None
        loop, p = self._loop, self.cfg.workers
        metrics = self.evaluator.evaluate(loop.center.cpu(), self.split.test_x, self.split.test_y)
        counts = {
            "exchanges": p * loop.rounds,
            "server_updates": loop.rounds,
            "worker_steps": p * loop.role.step,
        }
        if final:
            self.record.runlog.evaluation(
                wall_s=self.record.elapsed(),
                test_loss=metrics["test_loss"],
                test_error=metrics["test_error"],
                **counts,
            )
        else:
            self.record.evaluated(metrics, **counts)
        return metrics

    def decide(self) -> tuple[bool, bool]:
        """(start a snapshot at this exchange, stop after this exchange), for every rank."""
        now = time.perf_counter()
        every = self.cfg.checkpoint.every_s
        save = bool(every) and now - self._last_save >= every
        if save:
            self._last_save = now
        return save, self.record.check_stop()

    def after_exchange(self, report: ExchangeReport) -> None:
        """Advance the progress bar, log the ranks' reports, evaluate when due."""
        p, record = self.cfg.workers, self.record
        record.progress.advance(p * (report.step - self._last_step), exchanges=p * report.rounds)
        self._last_step = report.step
        if record.runlog.writes_scalars:
            for index in range(p):
                tag = f"worker{index + 1}"
                record.runlog.scalar(f"{tag}/train_loss", report.train_losses[index], report.step)
                record.runlog.scalar(
                    f"{tag}/elastic_distance", report.distances[index], report.step
                )
            record.runlog.scalar("allreduce/latency_ms", report.latency_ms, report.step)
        if record.cadence.due(record.elapsed()):
            self.evaluate()

    def _summary(
        self, outcome: LoopOutcome, final: dict[str, float], restarts: int, resumed_step: int
    ) -> Summary:
        p = self.cfg.workers
        figures = RunFigures(
            wall_time_s=self.record.elapsed(),
            worker_steps=p * outcome.steps,
            exchanges=p * outcome.rounds,
            server_updates=outcome.rounds,
            test_loss=final["test_loss"],
            test_error=final["test_error"],
            stop_reason=self.record.stop_reason,
        )
        return Summary.of_run(
            self.cfg,
            figures,
            topology="allreduce",
            num_params=self.num_params,
            restarts=restarts,
            resumed_worker_steps={str(r + 1): resumed_step for r in range(p)},
            details={
                "resumed_step": resumed_step,
                "steps_per_s_rank0": outcome.steps_per_s,
                "mean_allreduce_ms": outcome.mean_allreduce_ms,
            },
        )
