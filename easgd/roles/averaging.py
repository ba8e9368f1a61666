"""The averaging family's roles (local SGD, DiLoCo): the worker and the replicated center.

A worker takes inner SGD or Nesterov steps and, every tau steps, sends x_i and takes the reply,
the new center: x_i <- x~. Its velocity v_i is left as it is (PyTorch's averager does nothing to
momentum buffers either). The center's rule is :mod:`easgd.algorithms.periodic` applied to the
sum of the workers' x_j: :class:`AveragingCenter` holds x~ (and DiLoCo's outer momentum m). The
all-reduce loop keeps one per rank (every copy stays identical, since every rank adds the same
sum); the simulator's :class:`AveragingServer` keeps one for all workers. No transport here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from easgd.algorithms import periodic
from easgd.config.algorithm import AlgorithmConfig
from easgd.roles.server import ServerRole
from easgd.roles.worker import ElasticWorker


class AveragingWorker(ElasticWorker):
    """Inner SGD/Nesterov steps; every tau steps sends x_i and restarts from the reply, x~.

    The elastic worker's variables and local step (with ``params_in_scratch``, momentum 0: x_i
    lives in the model's parameters, which are also the gradient point, so a step copies
    nothing); only the reply differs: x_i <- x~ at once (the velocity is left as it is), and the
    step's gradient is taken at the new x_i (+ delta v_i), not at the point sent.
    """

    def outgoing(self) -> Tensor:
        return self.params

    def apply_reply(self, reply: Tensor) -> None:
        self.params.copy_(reply)  # x_i <- x~; the velocity stays local and untouched

    def gradient_point(self) -> Tensor:
        return self._fill_lookahead()


class AveragingCenter:
    """x~ and the round's rule: local SGD's average, or DiLoCo's outer Nesterov step.

    ``center`` is updated in place (the all-reduce loop's copy of x~); ``outer_momentum`` None
    is local SGD. :meth:`apply_sum` also measures ||x~_new - x~_old|| when asked.
    """

    def __init__(
        self,
        center: Tensor,
        *,
        num_workers: int,
        outer_learning_rate: float | None = None,
        outer_momentum: float | None = None,
    ) -> None:
        self.center = center
        self.num_workers = num_workers
        self.diloco = outer_learning_rate is not None
        self.outer_learning_rate = outer_learning_rate or 0.0
        self.outer_momentum = outer_momentum or 0.0
        if self.diloco:
            periodic.check_outer_learning_rate(self.outer_learning_rate)
            periodic.check_outer_momentum(self.outer_momentum)
        self.momentum_buffer = torch.zeros_like(center) if self.diloco else None
        self._scratch = torch.empty_like(center)
        self.measure = False
        """Whether :meth:`exchange` measures ||x~_new - x~_old|| (one more pass over x~)."""
        self.last_update_norm = 0.0
        """||x~_new - x~_old|| of the last round (when measured)."""

    @classmethod
    def of(cls, config: AlgorithmConfig, center: Tensor, *, num_workers: int) -> AveragingCenter:
        """The center rule of ``config`` (localsgd or diloco) over ``center``."""
        if not config.spec.outer_optimizer:
            return cls(center, num_workers=num_workers)
        rate, momentum = config.resolved_outer
        return cls(
            center, num_workers=num_workers, outer_learning_rate=rate, outer_momentum=momentum
        )

    def apply_sum(self, summed: Tensor, *, measure: bool = False) -> None:
        """One round from ``summed`` = sum_j x_j (only read): x~ becomes the new center."""
        if measure:
            self._scratch.copy_(self.center)
        if self.momentum_buffer is None:
            periodic.localsgd_round_(self.center, summed, num_workers=self.num_workers)
        else:
            scratch = self._scratch if not measure else torch.empty_like(self.center)
            outer = {"outer_learning_rate": self.outer_learning_rate}
            outer["outer_momentum"] = self.outer_momentum
            periodic.diloco_round_(
                self.center,
                self.momentum_buffer,
                summed,
                scratch,
                num_workers=self.num_workers,
                **outer,
            )
        if measure:
            self.last_update_norm = float(torch.dist(self.center, self._scratch))

    def exchange(self, sent: Tensor, reduce_sum: Callable[[Tensor], Tensor]) -> Tensor:
        """One rank's round: the sum of every rank's x_j, then the new x~, which is returned
        (live: the worker copies it at once)."""
        self.apply_sum(reduce_sum(sent), measure=self.measure)
        return self.center

    def drift(self, worker: Tensor) -> float:
        """||x_i - x~||: how far a worker drifted from the last center (x~ not yet moved)."""
        return float(torch.dist(worker, self.center))

    def tensors(self) -> dict[str, Tensor]:
        """The live state besides x~ (DiLoCo's outer momentum), by key."""
        return {} if self.momentum_buffer is None else {"outer_momentum": self.momentum_buffer}


class AveragingServer(ServerRole):
    """The simulator's center for the averaging family: synchronous rounds only."""

    synchronous_round = True

    def __init__(self, config: AlgorithmConfig, center: Tensor, *, num_workers: int) -> None:
        super().__init__(center)
        self.rule = AveragingCenter.of(config, self.center, num_workers=num_workers)
        self.name = config.name

    def handle(self, worker: int, payload: Tensor | None, **options: object) -> Tensor:
        raise ValueError(
            f"{self.name} averages every worker at once: simulate it on the synchronous schedule "
            "(sim.schedule=synchronous; mode=simulate topology=allreduce)"
        )

    def update_norm(self, payload: Tensor) -> float | None:
        return None

    def handle_round(self, payloads: list[Tensor]) -> list[Tensor]:
        # summed in worker order, as the all-reduce of the replicated-center loop sums ranks
        if len(payloads) != self.rule.num_workers:
            raise ValueError(f"a round needs all {self.rule.num_workers} workers' x_i")
        self.rule.apply_sum(sum(payloads[1:], payloads[0]))
        self.updates += 1
        reply = self.center.clone()
        return [reply] * len(payloads)

    def _tensors(self) -> dict[str, Tensor]:
        return {**super()._tensors(), **self.rule.tensors()}
