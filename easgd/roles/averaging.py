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

from easgd.algorithms import inplace, periodic
from easgd.algorithms.inplace import Grad
from easgd.config.algorithm import AlgorithmConfig
from easgd.roles.server import ServerRole
from easgd.roles.worker import NesterovWorker


class AveragingWorker(NesterovWorker):
    """Inner SGD/Nesterov steps; every tau steps sends x_i and restarts from the reply, x~.

    ``params_in_scratch`` (momentum 0, with ``scratch``): x_i lives in ``scratch`` (the model's
    parameters), which is also the gradient point, so a step copies nothing; the step is then
    :func:`easgd.algorithms.inplace.sgd_step_` (no velocity written), the same bits as the
    Nesterov step with momentum 0.
    """

    def __init__(
        self,
        params: Tensor,
        *,
        comm_period: int,
        learning_rate: float,
        momentum: float,
        scratch: Tensor | None = None,
        params_in_scratch: bool = False,
    ) -> None:
        super().__init__(
            params,
            comm_period=comm_period,
            learning_rate=learning_rate,
            momentum=momentum,
            scratch=scratch,
        )
        self._step_buffer: Tensor | None = None
        if params_in_scratch:
            if scratch is None or self.momentum != 0:
                raise ValueError("params_in_scratch needs a scratch buffer and momentum 0")
            scratch.copy_(self.params)
            self.params = scratch
            self._step_buffer = torch.empty(
                min(inplace.CHUNK, scratch.numel()), dtype=scratch.dtype, device=scratch.device
            )

    def outgoing(self) -> Tensor:
        return self.params

    def apply_reply(self, reply: Tensor) -> None:
        self.params.copy_(reply)  # x_i <- x~; the velocity stays local and untouched

    def _fill_lookahead(self) -> Tensor:
        if self.lookahead is self.params:
            return self.lookahead
        return super()._fill_lookahead()

    def local_step(self, grad: Grad) -> None:
        if self._step_buffer is None:
            super().local_step(grad)
            return
        inplace.sgd_step_(
            self.params, grad, learning_rate=self.learning_rate, buffer=self._step_buffer
        )
        self.step += 1


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
            periodic.diloco_round_(
                self.center,
                self.momentum_buffer,
                summed,
                scratch,
                num_workers=self.num_workers,
                outer_learning_rate=self.outer_learning_rate,
                outer_momentum=self.outer_momentum,
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

    def handle(
        self,
        worker: int,
        payload: Tensor | None,
        *,
        out: Tensor | None = None,
        max_update_norm: float | None = None,
    ) -> Tensor:
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
