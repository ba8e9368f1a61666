"""Synchronous rounds with a replicated center (``topology=allreduce``): one rank's loop.

Every rank keeps x_i (and v_i for a momentum worker) and its own copy of the center x~; a round
rule (:class:`RoundRule`) says what a round does with one all-reduce:

- EASGD/EAMSGD (:class:`ElasticRound`): every tau steps each rank computes e_i = alpha (x_i - x~),
  moves x_i -= e_i and adds all_reduce_sum(e_i) to its copy of x~
  (:func:`easgd.algorithms.replicated_center_exchange`, applied in place);
- local SGD and DiLoCo (:class:`easgd.roles.averaging.AveragingCenter`): each rank sums every
  x_j, its copy of x~ becomes the average (local SGD) or takes DiLoCo's outer Nesterov step, and
  x_i <- x~.

Every copy adds the same sum, so every copy stays identical. The worker side is the same role and
:func:`worker_step` as in the server topology and the simulator, so the order of exchange and
gradient is the spec's.

Control values ride in the all-reduce buffer (no extra messages): rank 0 decides when everyone
saves a snapshot and when everyone stops, every rank reports the newest snapshot it has saved
(so rank 0 knows when one is complete), its mean train loss and its elastic distance, so every
rank acts on the same exchange and the ranks stay in lockstep. The process main that runs this
loop with rank 0's duties is :mod:`easgd.topologies.allreduce`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from easgd.algorithms import inplace
from easgd.config.algorithm import AlgorithmConfig
from easgd.data.sampling import MinibatchSampler
from easgd.flat import FlatModel
from easgd.recovery.allreduce_snapshots import RankSnapshots
from easgd.roles import ElasticWorker, GradientFn, WorkerRole, worker_step
from easgd.roles.averaging import AveragingCenter, AveragingWorker

log = logging.getLogger("easgd")

ReduceFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
"""(values, control) -> (sum over ranks of values, sum over ranks of control); :class:`AllReduceSum`."""

SAVE, STOP, SAVED, REPORTS = 0, 1, 2, 3
"""Control slots: the snapshot rank 0 starts (its number; 0: none) and rank 0's stop flag; the
newest snapshot each rank has saved (summed); then p train losses and p distances."""


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
    """Each rank's ||x_i - x~|| before the round (0 when not measured): the elastic distance, or
    local SGD's and DiLoCo's worker drift from the last center."""
    latency_ms: float
    """This rank's wall time inside the all-reduce (waiting for the slowest rank included)."""
    center_update_norm: float = 0.0
    """||x~_new - x~_old|| of this round (0 when not measured): DiLoCo's outer update norm."""


@dataclass
class LoopOutcome:
    """One rank's end-of-loop figures."""

    steps: int
    rounds: int
    steps_per_s: float
    mean_allreduce_ms: float
    mean_drift: float | None = None
    """Mean over rounds and ranks of ||x_i - x~|| before the round (None: not measured)."""
    mean_center_update_norm: float | None = None
    """Mean over rounds of ||x~_new - x~_old|| (None: not measured)."""


class RoundRule(Protocol):
    """What one round does with this rank's copy of the center and one all-reduce."""

    center: Tensor
    """This rank's copy of x~, updated in place."""
    last_update_norm: float
    """||x~_new - x~_old|| of the last round (when measured)."""

    def exchange(self, sent: Tensor, reduce_sum: Callable[[Tensor], Tensor]) -> Tensor:
        """The round for this rank's payload; returns the reply for ``role.incoming``."""
        ...

    def drift(self, reduced: Tensor) -> float:
        """||x_i - x~|| before the round, from what ``reduce_sum`` was given (x~ not yet moved)."""
        ...

    def tensors(self) -> dict[str, Tensor]:
        """The rule's live state besides x~, by key (snapshots save and restore it)."""
        ...


class ElasticRound:
    """EASGD's replicated-center exchange: e_i = alpha (x_i - x~), x~ += sum_j e_j."""

    def __init__(self, center: Tensor, *, moving_rate: float, measure: bool = False) -> None:
        self.center = center
        self.moving_rate = moving_rate
        self.measure = measure
        self.last_update_norm = 0.0
        self._diff = torch.empty_like(center)  # e_i of the current exchange

    def exchange(self, sent: Tensor, reduce_sum: Callable[[Tensor], Tensor]) -> Tensor:
        def summed(diff: Tensor) -> Tensor:
            total = reduce_sum(diff)
            if self.measure:  # the center moves by exactly the sum
                self.last_update_norm = float(total.norm())
            return total

        return inplace.replicated_center_exchange_(
            self._diff, sent, self.center, moving_rate=self.moving_rate, reduce_sum=summed
        )

    def drift(self, reduced: Tensor) -> float:
        return float(reduced.norm()) / self.moving_rate  # e = alpha (x_i - x~)

    def tensors(self) -> dict[str, Tensor]:
        return {}  # the elastic exchange keeps nothing besides x~


class ReplicatedCenterLoop:
    """Runs one rank: local steps of ``role``, and every tau steps a round through ``reduce``.

    ``rule``: the round (an :class:`AveragingCenter` over this rank's copy of x~ for local SGD
    and DiLoCo); None: EASGD's :class:`ElasticRound` over a copy of ``center`` with
    ``moving_rate``. ``measure_distance``: measure every round's drift and center update norm.
    ``decide`` (rank 0 only) returns (start a snapshot now, stop now) before each exchange; every
    rank reads the decision from the sum, saves its part through ``snapshots`` after that step and
    stops after it. ``after_exchange`` sees every :class:`ExchangeReport`; ``after_step`` runs
    after each local step (fault injection).
    """

    def __init__(
        self,
        role: WorkerRole,
        center: Tensor,
        reduce: ReduceFn,
        gradient: GradientFn,
        *,
        rank: int,
        num_workers: int,
        moving_rate: float = 0.0,
        steps: int,
        rule: RoundRule | None = None,
        rounds_before: int = 0,
        slowdown: float = 1.0,
        measure_distance: bool = False,
        decide: Callable[[], tuple[bool, bool]] | None = None,
        snapshots: RankSnapshots | None = None,
        after_exchange: Callable[[ExchangeReport], None] | None = None,
        after_step: Callable[[WorkerRole], None] | None = None,
    ) -> None:
        self.role = role
        if rule is None:  # this rank's copy of x~, updated in place
            rule = ElasticRound(
                center.detach().clone(), moving_rate=moving_rate, measure=measure_distance
            )
        self.rule = rule
        self.reduce = reduce
        self.gradient = gradient
        self.rank = rank
        self.num_workers = num_workers
        self.steps = steps
        self.rounds = rounds_before
        self.slowdown = slowdown
        self.measure_distance = measure_distance
        self.decide = decide
        self.snapshots = snapshots
        self.after_exchange = after_exchange
        self.after_step = after_step
        self.stop_requested = False
        self._save_number = 0  # the snapshot every rank saves after this step (0: none)
        self._loss_sum: float | Tensor = 0.0  # a device tensor is read only at the exchange
        self._loss_count = 0
        self._allreduce_ms: list[float] = []
        self._drift_sum, self._update_norm_sum = 0.0, 0.0

    @property
    def center(self) -> Tensor:
        """This rank's copy of x~ (live)."""
        return self.rule.center

    def _exchange(self, sent: Tensor | None) -> Tensor:
        assert sent is not None
        control = self._control()
        summed_control = control

        def reduce_sum(contribution: Tensor) -> Tensor:
            nonlocal summed_control
            if self.measure_distance:
                control[REPORTS + self.num_workers + self.rank] = self.rule.drift(contribution)
            started = time.perf_counter()
            summed, summed_control = self.reduce(contribution, control)
            self._allreduce_ms.append(1000 * (time.perf_counter() - started))
            # one read-only pass: the same verdict on every rank, since every rank has the same sum
            if not math.isfinite(float(summed.sum())):
                self._non_finite(contribution)
            return summed

        reply = self.rule.exchange(sent, reduce_sum)
        self.rounds += 1
        self._save_number = int(summed_control[SAVE].item())
        self.stop_requested = self.stop_requested or summed_control[STOP].item() > 0
        if self.snapshots is not None:
            self.snapshots.exchanged(summed_control[SAVED].item())
        p = self.num_workers
        distances = summed_control[REPORTS + p : REPORTS + 2 * p].tolist()
        if self.measure_distance:
            self._drift_sum += sum(distances) / p
            self._update_norm_sum += self.rule.last_update_norm
        if self.after_exchange is not None:
            self.after_exchange(
                ExchangeReport(
                    rounds=self.rounds,
                    step=self.role.step,
                    train_losses=summed_control[REPORTS : REPORTS + p].tolist(),
                    distances=distances,
                    latency_ms=self._allreduce_ms[-1],
                    center_update_norm=self.rule.last_update_norm,
                )
            )
        return reply

    def _control(self) -> Tensor:
        """This rank's control values for the next exchange (rank 0's decisions, reports)."""
        control = torch.zeros(control_slots(self.num_workers), dtype=torch.float64)
        if self.decide is not None:
            save, stop = self.decide()
            if save and self.snapshots is not None:
                control[SAVE] = float(self.snapshots.next_number)
            control[STOP] = float(stop)
        if self.snapshots is not None:
            control[SAVED] = float(self.snapshots.saved)
        mean_loss = float(self._loss_sum) / self._loss_count if self._loss_count else 0.0
        self._loss_sum, self._loss_count = 0.0, 0
        control[REPORTS + self.rank] = mean_loss
        return control

    def _non_finite(self, contribution: Tensor) -> None:
        """Stop on a non-finite sum (every rank sees the same one), saying whether this rank's
        own contribution (elastic difference, or x_i) was the non-finite one (there is no server
        guard to reset it)."""
        whose = "this rank's" if not math.isfinite(float(contribution.sum())) else "another rank's"
        what = "elastic difference was" if isinstance(self.rule, ElasticRound) else "x_i was"
        raise FloatingPointError(
            f"the center became non-finite at exchange {self.rounds + 1} (step {self.role.step}): "
            f"{whose} {what} non-finite (a diverged worker, or fault.nan_rank); "
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
            if self._save_number and self.snapshots is not None:
                # after the step: every rank at the same t, no reply pending
                self.snapshots.save(self._save_number)
            self._save_number = 0
            if self.after_step is not None:
                self.after_step(self.role)
            if self.slowdown > 1.0:
                time.sleep((self.slowdown - 1.0) * (time.perf_counter() - step_started))
        elapsed = max(time.perf_counter() - started, 1e-9)
        measured = len(self._allreduce_ms) if self.measure_distance else 0
        return LoopOutcome(
            steps=self.role.step,
            rounds=self.rounds,
            steps_per_s=(self.role.step - first_step) / elapsed,
            mean_allreduce_ms=sum(self._allreduce_ms) / max(1, len(self._allreduce_ms)),
            mean_drift=self._drift_sum / measured if measured else None,
            mean_center_update_norm=self._update_norm_sum / measured if measured else None,
        )


# -- one rank's worker and round ----------------------------------------------------------------
def rank_worker(config: AlgorithmConfig, flat: FlatModel, *, comm_period: int) -> WorkerRole:
    """This rank's worker, starting at the model's parameters, with no copy per step.

    The gradient point is written straight into the model's parameters (``scratch``, as the
    server topology's workers do); with momentum 0 (EASGD, local SGD/DiLoCo with SGD inside) the
    gradient point is x_i itself, so x_i lives there (``params_in_scratch``) and a step copies
    nothing at all. The loop below calls ``local_step`` right after each exchange, as
    ``params_in_scratch`` requires.
    """
    config.spec.check_allreduce()
    worker_type = AveragingWorker if config.spec.family == "averaging" else ElasticWorker
    return worker_type(
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


def rank_round(
    config: AlgorithmConfig, center: Tensor, *, num_workers: int, measure: bool
) -> RoundRule:
    """This rank's round rule over (a copy of) ``center``: EASGD's elastic exchange, or local
    SGD's / DiLoCo's :class:`AveragingCenter`."""
    copy = center.detach().clone()
    if config.spec.family != "averaging":
        return ElasticRound(
            copy, moving_rate=config.resolved_moving_rate(num_workers), measure=measure
        )
    rule = AveragingCenter.of(config, copy, num_workers=num_workers)
    rule.measure = measure
    return rule
