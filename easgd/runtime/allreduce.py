"""Synchronous EASGD with a replicated center (``topology=allreduce``): p ranks, no server.

    # 4 workers, no server process: world size = workers
    torchrun --standalone --nproc_per_node=4 -m easgd.train topology=allreduce workers=4
    python -m easgd.train topology=allreduce workers=4        # the same, self-launched

Every rank keeps x_i (and v_i for EAMSGD) and its own copy of the center x~. Every tau steps each
rank computes e_i = alpha (x_i - x~), moves x_i -= e_i and adds all_reduce_sum(e_i) to its copy of
x~ (:func:`easgd.algorithms.replicated_center_exchange`, applied in place), so every copy stays
identical. The worker side is the same :class:`ElasticWorker` and :func:`worker_step` as in the
server topology and the simulator, so the order of exchange and gradient is the spec's.

Control values ride in the all-reduce buffer (no extra messages): rank 0 decides when everyone
checkpoints and when everyone stops, and each rank reports its mean train loss and elastic
distance, so every rank acts on the same exchange and the ranks stay in lockstep. Rank 0
evaluates x~ between exchanges (the others wait for it at the next all-reduce) and writes
summary.json, metrics.csv and TensorBoard files like the server topology. Each rank checkpoints
its own variables and its copy of x~ at the same step; a restarted job resumes from the newest
step that every rank holds.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from easgd.algorithms import inplace
from easgd.comm.allreduce import AllReduceSum, all_ranks_min, allreduce_backend, init_world
from easgd.comm.groups import DistEnv, LaunchError, shutdown
from easgd.comm.transport import Delay
from easgd.config.algorithm import AlgorithmConfig
from easgd.config.schema import TrainConfig
from easgd.data.sampling import MinibatchSampler
from easgd.data.split import Split
from easgd.flat import FlatModel
from easgd.roles import ElasticWorker, GradientFn, worker_step
from easgd.runtime.checkpoint import Checkpointer, CheckpointError, check_compatible
from easgd.runtime.components import build_model, build_split, device_for, evaluator_for
from easgd.runtime.faults import FaultInjector
from easgd.runtime.process import setup_logging
from easgd.runtime.progress import Progress
from easgd.runtime.resume import checkpoint_signature
from easgd.runtime.runlog import RunLog
from easgd.runtime.server import StopRule
from easgd.runtime.summary import RunFigures, Summary, hparams_of, write_summary

log = logging.getLogger("easgd")

ReduceFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
"""(values, control) -> (sum over ranks of values, sum over ranks of control); :class:`AllReduceSum`."""

SAVE, STOP, REPORTS = 0, 1, 2
"""Control slots: rank 0's checkpoint and stop flags, then p train losses and p distances."""


def control_slots(num_workers: int) -> int:
    """How many control values ride with each all-reduce."""
    return REPORTS + 2 * num_workers


@dataclass
class ExchangeReport:
    """What every rank learns from one all-reduce."""

    rounds: int
    """Exchanges of the center so far (each is one exchange per rank)."""
    step: int
    """The local step t at which it happened (the same on every rank)."""
    train_losses: list[float]
    """Each rank's mean minibatch loss since its previous exchange."""
    distances: list[float]
    """Each rank's ||x_i - x~|| before the move (0 when not measured)."""
    latency_ms: float
    """This rank's wall time inside the all-reduce (waiting for the slowest rank included)."""


@dataclass
class LoopOutcome:
    """One rank's end-of-loop figures."""

    steps: int
    rounds: int
    steps_per_s: float
    mean_allreduce_ms: float


class ReplicatedCenterLoop:
    """Runs one rank: local steps of ``role``, and every tau steps an exchange through ``reduce``.

    ``decide`` (rank 0 only) returns (checkpoint now, stop now) before each exchange; every rank
    reads the decision from the sum, checkpoints through ``checkpoint`` after that step and stops
    after it. ``after_exchange`` sees every :class:`ExchangeReport`; ``after_step`` runs after each
    local step (fault injection).
    """

    def __init__(
        self,
        role: ElasticWorker,
        center: Tensor,
        reduce: ReduceFn,
        gradient: GradientFn,
        *,
        rank: int,
        num_workers: int,
        moving_rate: float,
        steps: int,
        rounds_before: int = 0,
        slowdown: float = 1.0,
        measure_distance: bool = False,
        decide: Callable[[], tuple[bool, bool]] | None = None,
        checkpoint: Callable[[ReplicatedCenterLoop], None] | None = None,
        after_exchange: Callable[[ExchangeReport], None] | None = None,
        after_step: Callable[[ElasticWorker], None] | None = None,
    ) -> None:
        self.role = role
        self.center = center.detach().clone()  # this rank's copy of x~, updated in place
        self._diff = torch.empty_like(self.center)  # e_i of the current exchange
        self.reduce = reduce
        self.gradient = gradient
        self.rank = rank
        self.num_workers = num_workers
        self.moving_rate = moving_rate
        self.steps = steps
        self.rounds = rounds_before
        self.slowdown = slowdown
        self.measure_distance = measure_distance
        self.decide = decide
        self.checkpoint = checkpoint
        self.after_exchange = after_exchange
        self.after_step = after_step
        self.stop_requested = False
        self._save_due = False
        self._loss_sum: float | Tensor = 0.0  # a device tensor is read only at the exchange
        self._loss_count = 0
        self._allreduce_ms: list[float] = []

    def _exchange(self, sent: Tensor | None) -> Tensor:
        assert sent is not None
        slots = control_slots(self.num_workers)
        control = torch.zeros(slots, dtype=torch.float64)
        if self.decide is not None:
            save, stop = self.decide()
            control[SAVE], control[STOP] = float(save), float(stop)
        mean_loss = float(self._loss_sum) / self._loss_count if self._loss_count else 0.0
        self._loss_sum, self._loss_count = 0.0, 0
        control[REPORTS + self.rank] = mean_loss
        summed_control = control

        def reduce_sum(diff: Tensor) -> Tensor:
            nonlocal summed_control
            if self.measure_distance:  # e = alpha (x_i - x~), so ||x_i - x~|| = ||e|| / alpha
                distance = float(diff.norm()) / self.moving_rate
                control[REPORTS + self.num_workers + self.rank] = distance
            started = time.perf_counter()
            summed, summed_control = self.reduce(diff, control)
            self._allreduce_ms.append(1000 * (time.perf_counter() - started))
            # one read-only pass: the same verdict on every rank, since every rank has the same sum
            if not math.isfinite(float(summed.sum())):
                self._non_finite(diff)
            return summed

        diff = inplace.replicated_center_exchange_(
            self._diff, sent, self.center, moving_rate=self.moving_rate, reduce_sum=reduce_sum
        )
        self.rounds += 1
        self._save_due = summed_control[SAVE].item() > 0
        self.stop_requested = self.stop_requested or summed_control[STOP].item() > 0
        if self.after_exchange is not None:
            p = self.num_workers
            self.after_exchange(
                ExchangeReport(
                    rounds=self.rounds,
                    step=self.role.step,
                    train_losses=summed_control[REPORTS : REPORTS + p].tolist(),
                    distances=summed_control[REPORTS + p : REPORTS + 2 * p].tolist(),
                    latency_ms=self._allreduce_ms[-1],
                )
            )
        return diff

    def _non_finite(self, diff: Tensor) -> None:
        """Stop on a non-finite sum (every rank sees the same one), saying whether this rank's
        own elastic difference was the non-finite one (there is no server guard to reset it)."""
        whose = "this rank's" if not math.isfinite(float(diff.sum())) else "another rank's"
        raise FloatingPointError(
            f"the center became non-finite at exchange {self.rounds + 1} (step {self.role.step}): "
            f"{whose} elastic difference was non-finite (a diverged worker, or fault.nan_rank); "
            "lower algorithm.learning_rate"
        )

    def run(self) -> LoopOutcome:
        """Step until the budget is spent or rank 0 asked every rank to stop."""
        started, first_step = time.perf_counter(), self.role.step
        while self.role.step < self.steps and not self.stop_requested:
            step_started = time.perf_counter()
            loss = worker_step(self.role, self.gradient, self._exchange)
            self._loss_sum += loss
            self._loss_count += 1
            if self._save_due and self.checkpoint is not None:
                self.checkpoint(self)  # after the step: every rank at the same t, nothing pending
            self._save_due = False
            if self.after_step is not None:
                self.after_step(self.role)
            if self.slowdown > 1.0:
                time.sleep((self.slowdown - 1.0) * (time.perf_counter() - step_started))
        elapsed = max(time.perf_counter() - started, 1e-9)
        return LoopOutcome(
            steps=self.role.step,
            rounds=self.rounds,
            steps_per_s=(self.role.step - first_step) / elapsed,
            mean_allreduce_ms=sum(self._allreduce_ms) / max(1, len(self._allreduce_ms)),
        )


# -- one rank's worker ------------------------------------------------------------------------
def rank_worker(config: AlgorithmConfig, flat: FlatModel, *, comm_period: int) -> ElasticWorker:
    """This rank's elastic worker, starting at the model's parameters, with no copy per step.

    The gradient point is written straight into the model's parameters (``scratch``, as the
    server topology's workers do); for EASGD (momentum 0) the gradient point is x_i itself, so x_i
    lives there (``params_in_scratch``) and a step copies nothing at all. The loop below calls
    ``local_step`` right after each exchange, as ``params_in_scratch`` requires.
    """
    config.spec.check_allreduce()
    return ElasticWorker(
        flat.initial_point(),
        comm_period=comm_period,
        learning_rate=config.learning_rate,
        momentum=config.momentum,
        scratch=flat.flat_params,
        params_in_scratch=config.momentum == 0,
    )


def sampled_gradient(flat: FlatModel, sampler: MinibatchSampler) -> GradientFn:
    """The gradient function of the loop: :meth:`FlatModel.gradient` on the next minibatch.

    The hot path: the loss stays a tensor until the exchange reads it, and the gradient is the
    per-parameter pieces autograd produced (no flat buffer to zero and accumulate into).
    """
    return lambda point: flat.gradient(point, *sampler.sample())


# -- checkpoints ------------------------------------------------------------------------------
def _checkpoint_steps(checkpointer: Checkpointer) -> list[tuple[int, Path]]:
    """This rank's checkpoint files, newest first, with the step each was taken at (in its name)."""
    pattern = re.compile(rf"^{re.escape(checkpointer.name)}-step(\d+)-\d+\.pt$")
    found = []
    if checkpointer.directory.is_dir():
        for path in checkpointer.directory.iterdir():
            match = pattern.match(path.name)
            if match:
                found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def resume_common_step(
    checkpointer: Checkpointer, cfg: TrainConfig, signature: dict[str, Any]
) -> dict[str, Any] | None:
    """The state at the newest step that every rank has an intact checkpoint of (None: fresh).

    Called on every rank at once (it takes part in one all-reduce). A rank can be at most one
    checkpoint ahead of another (a crash between two ranks' saves), and ``checkpoint.keep`` >= 2
    keeps the one before, so the common step is found on every rank.
    """
    newest = -1
    if cfg.checkpoint.resume:
        for step, path in _checkpoint_steps(checkpointer):
            try:
                Checkpointer.read(path)
            except CheckpointError as err:
                log.warning("skipping checkpoint: %s", err)
                continue
            newest = step
            break
    common = all_ranks_min(newest)
    if common < 0:
        return None
    for step, path in _checkpoint_steps(checkpointer):
        if step == common:
            state = Checkpointer.read(path)
            check_compatible(state, path=path, signature=signature)
            log.info("resuming from %s", path)
            return state
    raise CheckpointError(
        f"no checkpoint of step {common} in {checkpointer.directory} (the other ranks resume "
        "from it); raise checkpoint.keep or start a fresh run directory"
    )


# -- one process ------------------------------------------------------------------------------
def run_allreduce(cfg: TrainConfig) -> dict[str, Any] | None:
    """This process's part of a ``topology=allreduce`` run; rank 0 returns the summary."""
    env = DistEnv.from_environ()
    if env.world_size != cfg.workers:
        raise LaunchError(
            f"world size is {env.world_size} but topology=allreduce with workers={cfg.workers} "
            f"needs {cfg.workers} processes (no server rank); use torchrun "
            f"--nproc_per_node={cfg.workers}, or set workers={env.world_size}"
        )
    torch.set_num_threads(cfg.threads)
    setup_logging(f"rank{env.rank}")
    split = build_split(cfg.data)
    device = device_for(cfg, env.local_rank)
    _, generation = init_world(env, backend=allreduce_backend(device), timeout_s=cfg.comm.timeout_s)
    try:
        return _run_rank(cfg, env, split, device, generation=generation)
    finally:
        shutdown()


def _run_rank(
    cfg: TrainConfig, env: DistEnv, split: Split, device: torch.device, *, generation: int
) -> dict[str, Any] | None:
    rank, p = env.rank, cfg.workers
    model = build_model(cfg.model, split, seed=cfg.seed).to(device)
    flat = FlatModel(model, weight_decay=cfg.algorithm.weight_decay)
    moving_rate = cfg.algorithm.resolved_moving_rate(p)
    sampler = MinibatchSampler(
        split,
        batch_size=cfg.data.batch_size,
        worker_index=rank,
        num_workers=p,
        mode=cfg.data.sampling,
        seed=cfg.seed,
        device=device,
    )
    role = rank_worker(cfg.algorithm, flat, comm_period=cfg.comm.period)
    center = flat.initial_point()
    signature = {**checkpoint_signature(cfg, flat.num_params), "topology": "allreduce"}
    checkpointer = Checkpointer(
        Path(cfg.run_dir) / "checkpoints", f"rank{rank}", keep=max(2, cfg.checkpoint.keep)
    )
    state = resume_common_step(checkpointer, cfg, signature)
    restarts, rounds_before = 0, 0
    if state is not None:
        role.load_state_dict({k: _to(v, device) for k, v in state["role"].items()})
        center = state["center"].to(device)
        sampler.generator.set_state(state["rng"])
        restarts, rounds_before = int(state["restarts"]) + 1, int(state["rounds"])
    resumed_step = role.step

    def save(loop: ReplicatedCenterLoop) -> None:
        snapshot = {
            "role": loop.role.state_dict(),
            "center": loop.center,
            "rng": sampler.generator.get_state(),
            "rounds": loop.rounds,
            "restarts": restarts,
            "signature": signature,
        }
        # the step in the name lets a restarted rank find the step that every rank holds
        name = f"rank{rank}-step{loop.role.step:010d}"
        Checkpointer(checkpointer.directory, name, keep=1).save(snapshot)
        for _, old in _checkpoint_steps(checkpointer)[max(2, cfg.checkpoint.keep) :]:
            old.unlink(missing_ok=True)

    faults = FaultInjector(cfg.fault, rank, generation=generation, who=f"rank {rank}")

    def after_step(role: ElasticWorker) -> None:
        faults.worker_step(role.step, role.params)

    lead = _Lead(cfg, split, flat.num_params, resumed_step, rounds_before) if rank == 0 else None
    loop = ReplicatedCenterLoop(
        role,
        center,
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
        moving_rate=moving_rate,
        steps=cfg.steps_per_worker,
        rounds_before=rounds_before,
        slowdown=cfg.comm.slowdown[rank] if cfg.comm.slowdown else 1.0,
        measure_distance=cfg.tensorboard,
        decide=lead.decide if lead is not None else None,
        checkpoint=save,
        after_exchange=lead.after_exchange if lead is not None else None,
        after_step=after_step,
    )
    if lead is None:
        loop.run()
        save(loop)
        return None
    try:
        lead.start(loop)
        outcome = loop.run()
        save(loop)
    except BaseException:
        lead.runlog.close()
        raise
    return lead.finish(outcome, restarts=restarts, resumed_step=resumed_step)


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, Tensor) else value


class _Lead:
    """Rank 0's extra duties: evaluate x~, apply the stop rules, time checkpoints, write the log."""

    def __init__(
        self, cfg: TrainConfig, split: Split, num_params: int, resumed_step: int, rounds: int
    ) -> None:
        self.cfg = cfg
        self.split = split
        self.num_params = num_params
        self.evaluator = evaluator_for(cfg, split)
        self.runlog = RunLog(cfg.run_dir, tensorboard=cfg.tensorboard)
        self.stop_rule = StopRule(
            max_wall_s=cfg.max_wall_s, target_test_error=cfg.target_test_error
        )
        self.progress = Progress(cfg.workers * cfg.steps_per_worker, enabled=cfg.progress)
        self.progress.advance(cfg.workers * resumed_step, exchanges=cfg.workers * rounds)
        self.stop_reason = "steps"
        self._loop: ReplicatedCenterLoop | None = None
        self._last_step = resumed_step
        self._started = self._last_save = time.perf_counter()
        self._next_eval = 0.0

    def start(self, loop: ReplicatedCenterLoop) -> None:
        self._loop = loop
        self._started = self._last_save = time.perf_counter()
        log.info(
            "%s over all-reduce with %d workers, tau=%d, %d parameters; run directory %s",
            self.cfg.algorithm.name,
            self.cfg.workers,
            self.cfg.comm.period,
            self.num_params,
            os.path.abspath(self.cfg.run_dir),
        )
        self.evaluate()

    def evaluate(self) -> dict[str, float]:
        assert self._loop is not None
        loop, p = self._loop, self.cfg.workers
        metrics = self.evaluator.evaluate(loop.center.cpu(), self.split.test_x, self.split.test_y)
        wall = time.perf_counter() - self._started
        self.runlog.evaluation(
            wall_s=wall,
            exchanges=p * loop.rounds,
            server_updates=loop.rounds,
            worker_steps=p * loop.role.step,
            test_loss=metrics["test_loss"],
            test_error=metrics["test_error"],
        )
        self.progress.note(test_error=metrics["test_error"])
        self._next_eval = wall + self.cfg.eval_interval_s
        return metrics

    def decide(self) -> tuple[bool, bool]:
        """(checkpoint after this exchange, stop after this exchange), for every rank."""
        now = time.perf_counter()
        every = self.cfg.checkpoint.every_s
        save = bool(every) and now - self._last_save >= every
        if save:
            self._last_save = now
        if self.stop_reason == "steps":
            reason = self.stop_rule.reason(elapsed_s=now - self._started)
            self.stop_reason = reason or "steps"
        return save, self.stop_reason != "steps"

    def after_exchange(self, report: ExchangeReport) -> None:
        p = self.cfg.workers
        self.progress.advance(p * (report.step - self._last_step), exchanges=p * report.rounds)
        self._last_step = report.step
        if self.runlog.writes_scalars:
            for index in range(p):
                tag = f"worker{index + 1}"
                self.runlog.scalar(f"{tag}/train_loss", report.train_losses[index], report.step)
                self.runlog.scalar(f"{tag}/elastic_distance", report.distances[index], report.step)
            self.runlog.scalar("allreduce/latency_ms", report.latency_ms, report.step)
        if time.perf_counter() - self._started >= self._next_eval:
            error = self.evaluate()["test_error"]
            if self.stop_reason == "steps":
                reason = self.stop_rule.reason(
                    elapsed_s=time.perf_counter() - self._started, test_error=error
                )
                self.stop_reason = reason or "steps"

    def finish(self, outcome: LoopOutcome, *, restarts: int, resumed_step: int) -> dict[str, Any]:
        assert self._loop is not None
        p = self.cfg.workers
        try:
            final = self.evaluate()
            self.progress.close()
            figures = RunFigures(
                wall_time_s=time.perf_counter() - self._started,
                worker_steps=p * outcome.steps,
                exchanges=p * outcome.rounds,
                server_updates=outcome.rounds,
                test_loss=final["test_loss"],
                test_error=final["test_error"],
                stop_reason=self.stop_reason,
            )
            summary = Summary.of_run(
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
            return write_summary(self.runlog, summary, hparams_of(self.cfg))
        finally:
            self.runlog.close()
