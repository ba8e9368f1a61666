"""Measurements taken inside a simulated run, without touching the simulator's code.

- :class:`ProbedObjective` wraps a :class:`~easgd.sim.objectives.ClassifierObjective`. Every time
  the simulator evaluates its center it also records the training-set loss and error of that
  point and the mean distance of the workers to the center, and it can end the run early: when the
  training loss first reaches a target (:class:`TargetReached`, with a copy of the point), or
  when the point stops being finite (:class:`Diverged`).
- :class:`ExchangeProbe` subscribes to the worker roles' reply hooks so that every exchange records how
  far the worker travelled since its previous exchange (``||x_i before this exchange - x_i after
  the previous one||``), the distance it covers on its own between two talks with the server.

Example::

    probed = ProbedObjective(objective, stop_train_loss=0.3)
    sim = Simulator(algorithm, sim_config, probed)
    probed.attach(sim)
    travel = ExchangeProbe(sim.workers)
    try:
        sim.run()
    except TargetReached as hit:
        point = hit.point  # the center when its train loss first reached 0.3
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor

from easgd.roles import WorkerRole
from easgd.sim.objectives import ClassifierObjective


@dataclass
class ProbeRecord:
    """One evaluation of the evaluated variable, with the extra measurements."""

    time: float
    steps: int
    train_loss: float
    train_error: float
    test_loss: float
    test_error: float
    worker_distance: float
    """Mean over workers of ||x_i - center|| (nan for sequential runs)."""
    center_norm: float


class StopRun(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised from inside the simulator's evaluation to end a run early."""

    def __init__(self, record: ProbeRecord, point: Tensor) -> None:
        super().__init__(f"stopped at time {record.time:g}")
        self.record = record
        self.point = point


class TargetReached(StopRun):  # noqa: N818
    """The training loss of the evaluated point reached the target."""


class Diverged(StopRun):  # noqa: N818
    """The evaluated point is no longer finite."""


class ProbedObjective:
    """A classifier objective whose evaluations also record train loss and worker spread."""

    def __init__(
        self,
        objective: ClassifierObjective,
        *,
        stop_train_loss: float | None = None,
        stop_on_divergence: bool = True,
        train_metrics: bool = True,
    ) -> None:
        self.objective = objective
        self.stop_train_loss = stop_train_loss
        self.stop_on_divergence = stop_on_divergence
        self.train_metrics = train_metrics or stop_train_loss is not None
        self.records: list[ProbeRecord] = []
        self._simulator: Any = None

    def attach(self, simulator: Any) -> None:
        """Give the probe the simulator whose workers, server and clock it reads."""
        self._simulator = simulator

    def initial_point(self) -> Tensor:
        return self.objective.initial_point()

    def gradient(self, point: Tensor, generator: torch.Generator) -> tuple[float, Tensor]:
        return self.objective.gradient(point, generator)

    def batch_support(self, *, speed: bool = False) -> str | None:
        return self.objective.batch_support(speed=speed)

    def gradients(
        self, points: Tensor, generators: Sequence[torch.Generator]
    ) -> tuple[Tensor, Tensor]:
        """The wrapped objective's batched gradients (the simulator's batched path lands every
        pending step before an evaluation, so the probes read the workers as they are)."""
        return self.objective.gradients(points, generators)

    def evaluate(self, point: Tensor) -> dict[str, float]:
        metrics = self.objective.evaluate(point)
        split, flat = self.objective.split, self.objective.flat
        train = (
            flat.evaluate(point, split.train_x, split.train_y)
            if self.train_metrics
            else {"test_loss": math.nan, "test_error": math.nan}
        )
        sim = self._simulator
        distance = math.nan
        if sim is not None and getattr(sim, "server", None) is not None:
            distance = float(
                torch.stack([(role.params - point).norm() for role in sim.workers]).mean()
            )
        record = ProbeRecord(
            time=float(sim.now) if sim is not None else math.nan,
            steps=sum(role.step for role in sim.workers) if sim is not None else 0,
            train_loss=train["test_loss"],
            train_error=train["test_error"],
            test_loss=metrics["test_loss"],
            test_error=metrics["test_error"],
            worker_distance=distance,
            center_norm=float(point.norm()),
        )
        self.records.append(record)
        if self.stop_on_divergence and not bool(torch.isfinite(point).all()):
            raise Diverged(record, point.clone())
        if self.stop_train_loss is not None and record.train_loss <= self.stop_train_loss:
            raise TargetReached(record, point.clone())
        return metrics


class ExchangeProbe:
    """Per exchange, how far each worker moved on its own since its previous exchange."""

    def __init__(self, workers: Sequence[WorkerRole]) -> None:
        self.travel: list[list[float]] = [[] for _ in workers]
        """travel[i]: one entry per exchange of worker i after its first."""
        self._after: list[Tensor | None] = [None for _ in workers]
        """x_i right after worker i's previous reply was applied."""
        for index, role in enumerate(workers):
            role.before_reply.append(partial(self._before, index))
            role.after_reply.append(partial(self._applied, index))

    def _before(self, index: int, role: WorkerRole, reply: Tensor) -> None:
        last = self._after[index]
        if last is not None:
            self.travel[index].append(float((role.params - last).norm()))

    def _applied(self, index: int, role: WorkerRole, reply: Tensor) -> None:
        self._after[index] = role.params.clone()  # roles update their params in place

    def mean_travel(self) -> float:
        """Mean travel over all exchanges of all workers (nan before any second exchange)."""
        values = [v for per_worker in self.travel for v in per_worker]
        return sum(values) / len(values) if values else math.nan
