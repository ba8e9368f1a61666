"""The simulator's batched path: gradient steps deferred, then taken for many workers in one call.

A worker's gradient step (its gradient at the role's gradient point, then its local step) reads
and writes only that worker's variables and draws only from that worker's minibatch generator,
so the gradient steps of different workers commute. :class:`DeferredSteps` therefore keeps each
worker's gradient step pending until something needs that worker again (its next exchange, a
reply landing, an evaluation, the end of the run) and then takes every pending step at once: one
:meth:`~easgd.sim.objectives.BatchedObjective.gradients` call over the stacked gradient points,
then each role's own local step (:func:`easgd.roles.apply_gradient`). Exchanges are not deferred:
they meet at the center and stay in virtual-time order.

The simulator decides when to flush (:meth:`easgd.sim.Simulator.run` and its schedules); this
module only keeps the queue. With equal speeds a flush takes the steps of all p workers; with
stragglers, of those that stepped since the last flush.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from easgd.config.schema import BATCHED_MODES, check_batched
from easgd.roles import WorkerRole, apply_gradient
from easgd.sim.objectives import BatchedObjective, Objective

__all__ = ["BATCHED_MODES", "DeferredSteps", "batching_refusal", "check_batched"]


def batching_refusal(objective: Objective, num_workers: int, *, speed: bool = False) -> str | None:
    """None when the batched path serves ``objective`` with ``num_workers`` workers; else why not.

    ``speed`` (what ``sim.batched=auto`` asks): also refuse where batching is correct but
    expected to be slower (one worker; a convolution on a CPU, see
    :meth:`easgd.flat.FlatModel.batch_support`)."""
    if not isinstance(objective, BatchedObjective):
        return f"{type(objective).__name__} has no batched gradients()"
    if speed and num_workers < 2:
        return "one worker has nothing to batch"
    return objective.batch_support(speed=speed)


class DeferredSteps:
    """Gradient steps waiting to be taken together (at most one per worker)."""

    def __init__(
        self,
        workers: Sequence[WorkerRole],
        objective: BatchedObjective,
        generators: Sequence[torch.Generator],
        on_gradient: list[Callable[[int, float], None]],
    ) -> None:
        self.workers = workers
        self.objective = objective
        self.generators = generators
        self.on_gradient = on_gradient
        """The simulator's observers: called with (worker, minibatch loss) before each step."""
        self._pending: list[int] = []
        self._is_pending = [False] * len(workers)
        self.calls = 0
        """Batched gradient calls made (a flush with pending steps is one)."""

    def defer(self, worker: int) -> None:
        """Queue ``worker``'s gradient step (it must have none pending)."""
        if self._is_pending[worker]:
            raise RuntimeError(f"worker {worker} already has a gradient step pending")
        self._is_pending[worker] = True
        self._pending.append(worker)

    def pending(self, worker: int) -> int:
        """1 when ``worker`` has a gradient step pending, else 0 (its local step counter lags by it)."""
        return int(self._is_pending[worker])

    @property
    def count(self) -> int:
        """Pending gradient steps."""
        return len(self._pending)

    def touch(self, worker: int) -> None:
        """Before anything reads or changes ``worker``'s variables: take the pending steps if
        ``worker`` has one (all of them, in one call: the others commute with it)."""
        if self._is_pending[worker]:
            self.flush()

    def flush(self) -> None:
        """Take every pending gradient step: one batched gradient call, then each local step."""
        if not self._pending:
            return
        order, self._pending = self._pending, []
        roles = [self.workers[worker] for worker in order]
        # each role's gradient point is read once (an elastic worker's is the pre-move point)
        points = torch.stack([role.gradient_point() for role in roles])
        losses, grads = self.objective.gradients(points, [self.generators[w] for w in order])
        self.calls += 1
        # one host read of all the losses, and only when someone observes them
        values = losses.tolist() if self.on_gradient else []
        for row, (worker, role) in enumerate(zip(order, roles, strict=True)):
            self._is_pending[worker] = False
            for hook in self.on_gradient:
                hook(worker, float(values[row]))
            apply_gradient(role, grads[row])
