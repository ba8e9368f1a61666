"""What a worker does in each algorithm, apart from how messages travel.

A worker role holds worker i's variables (x_i, and v_i or a_i) and composes the pure rules of
:mod:`easgd.algorithms`. It never sends anything itself: the simulator and the distributed runtime
move ``outgoing()`` to the server and hand the reply to ``incoming()``, and both drive a step
through :func:`worker_step`, so the order of exchange and gradient is written once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import Tensor

from easgd import algorithms as alg
from easgd.config.algorithm import AlgorithmConfig
from easgd.roles.state import restore

GradientFn = Callable[[Tensor], tuple[float, Tensor]]
"""Maps a point (flat parameter vector) to (minibatch loss, gradient at that point)."""

ExchangeFn = Callable[[Tensor | None], Tensor | None]
"""Sends a worker's payload to the server and returns the server's reply, or None when the reply
was already applied (or will be applied later, as in the runtime's overlap mode)."""


class WorkerRole(ABC):
    """Worker i's variables and rules for one algorithm, with the local step counter t_i."""

    def __init__(self, params: Tensor, *, comm_period: int) -> None:
        self.params = params.detach().clone()
        self.comm_period = alg.hyperparams.check_comm_period(comm_period)
        self.step = 0

    def due(self) -> bool:
        """Whether this step starts with an exchange (t_i % tau == 0)."""
        return alg.is_exchange_step(self.step, comm_period=self.comm_period)

    @abstractmethod
    def outgoing(self) -> Tensor | None:
        """The payload of this exchange (None: nothing to send yet)."""

    @abstractmethod
    def incoming(self, reply: Tensor) -> None:
        """Apply the server's reply to this worker's variables."""

    @abstractmethod
    def gradient_point(self) -> Tensor:
        """Where this step's stochastic gradient must be taken."""

    @abstractmethod
    def local_step(self, grad: Tensor) -> None:
        """Apply the local update with the gradient taken at :meth:`gradient_point`; t_i += 1."""

    def final_outgoing(self) -> Tensor | None:
        """A last payload to flush when the worker stops (only MDOWNPOUR has one)."""
        return None

    def reset(self, center: Tensor) -> None:
        """Restart from ``center`` with cleared local state (after the server rejected our values)."""
        self.params = center.detach().clone()

    def evaluated(self) -> Tensor:
        """The variable to evaluate for this worker (x_i; sequential averages return z)."""
        return self.params

    def state_dict(self) -> dict[str, Tensor | int]:
        """Every variable of the worker, for checkpoints."""
        return {"params": self.params, "step": self.step}

    def load_state_dict(self, state: dict[str, Tensor | int]) -> None:
        """Restore what :meth:`state_dict` returned."""
        restore(self, state)


class NesterovWorker(WorkerRole):
    """A worker whose local step is Nesterov momentum (plain SGD when momentum is 0)."""

    def __init__(
        self, params: Tensor, *, comm_period: int, learning_rate: float, momentum: float
    ) -> None:
        super().__init__(params, comm_period=comm_period)
        self.velocity = torch.zeros_like(self.params)
        self.learning_rate = learning_rate
        self.momentum = momentum

    def gradient_point(self) -> Tensor:
        return alg.nesterov_lookahead(self.params, self.velocity, momentum=self.momentum)

    def local_step(self, grad: Tensor) -> None:
        self.params, self.velocity = alg.nesterov_step(
            self.params,
            self.velocity,
            grad,
            learning_rate=self.learning_rate,
            momentum=self.momentum,
        )
        self.step += 1

    def reset(self, center: Tensor) -> None:
        super().reset(center)
        self.velocity = torch.zeros_like(self.params)

    def state_dict(self) -> dict[str, Tensor | int]:
        return {**super().state_dict(), "velocity": self.velocity}


class ElasticWorker(NesterovWorker):
    """EASGD (momentum 0) and EAMSGD (Algorithms 1 and 2). Sends x_i, receives e = alpha(x_i - center).

    The gradient of a step is taken at the value before the elastic move (x + delta * v), and the
    elastic move acts on x_i only, never on v_i.
    """

    def __init__(
        self, params: Tensor, *, comm_period: int, learning_rate: float, momentum: float
    ) -> None:
        super().__init__(
            params, comm_period=comm_period, learning_rate=learning_rate, momentum=momentum
        )
        self._point_before_move: Tensor | None = None

    def outgoing(self) -> Tensor:
        self._point_before_move = super().gradient_point()
        return self.params  # never modified in place: every rule returns new tensors

    def incoming(self, reply: Tensor) -> None:
        self.params = alg.apply_to_worker(self.params, reply)

    def gradient_point(self) -> Tensor:
        point, self._point_before_move = self._point_before_move, None
        return super().gradient_point() if point is None else point

    def reset(self, center: Tensor) -> None:
        super().reset(center)
        self._point_before_move = None


class DownpourWorker(WorkerRole):
    """DOWNPOUR and its averaging variants: push a_i, pull the center, then step from it."""

    def __init__(self, params: Tensor, *, comm_period: int, learning_rate: float) -> None:
        super().__init__(params, comm_period=comm_period)
        self.accumulated = torch.zeros_like(self.params)
        self.learning_rate = learning_rate

    def outgoing(self) -> Tensor:
        return self.accumulated.clone()

    def incoming(self, reply: Tensor) -> None:
        self.params, self.accumulated = alg.downpour_pull(reply)

    def gradient_point(self) -> Tensor:
        return self.params

    def local_step(self, grad: Tensor) -> None:
        self.params, self.accumulated = alg.downpour_local_step(
            self.params, self.accumulated, grad, learning_rate=self.learning_rate
        )
        self.step += 1

    def reset(self, center: Tensor) -> None:
        super().reset(center)
        self.accumulated = torch.zeros_like(self.params)

    def state_dict(self) -> dict[str, Tensor | int]:
        return {**super().state_dict(), "accumulated": self.accumulated}


class MDownpourWorker(WorkerRole):
    """MDOWNPOUR (tau = 1): each exchange sends the last gradient and receives the look-ahead y."""

    def __init__(self, params: Tensor) -> None:
        super().__init__(params, comm_period=1)
        self.pending_grad: Tensor | None = None

    def outgoing(self) -> Tensor | None:
        grad, self.pending_grad = self.pending_grad, None
        return grad

    def incoming(self, reply: Tensor) -> None:
        self.params = reply.clone()

    def gradient_point(self) -> Tensor:
        return self.params

    def local_step(self, grad: Tensor) -> None:
        self.pending_grad = grad.clone()
        self.step += 1

    def final_outgoing(self) -> Tensor | None:
        return self.outgoing()

    def reset(self, center: Tensor) -> None:
        super().reset(center)
        self.pending_grad = None


class SequentialWorker(NesterovWorker):
    """SGD, MSGD (Nesterov), ASGD (Polyak average) and MVASGD (moving average), p = 1, no server."""

    def __init__(
        self,
        params: Tensor,
        *,
        learning_rate: float,
        momentum: float,
        average: bool,
        average_rate: float | None,
    ) -> None:
        super().__init__(params, comm_period=1, learning_rate=learning_rate, momentum=momentum)
        self.average: Tensor | None = self.params.clone() if average else None
        self.average_rate = average_rate

    def due(self) -> bool:
        return False

    def outgoing(self) -> Tensor | None:  # pragma: no cover - never due
        raise RuntimeError("sequential algorithms never exchange")

    def incoming(self, reply: Tensor) -> None:  # pragma: no cover - never due
        raise RuntimeError("sequential algorithms never exchange")

    def local_step(self, grad: Tensor) -> None:
        super().local_step(grad)
        if self.average is not None:
            rate = alg.average_rate(self.step, constant_rate=self.average_rate)
            self.average = alg.running_average(self.average, self.params, rate=rate)

    def evaluated(self) -> Tensor:
        return self.params if self.average is None else self.average

    def state_dict(self) -> dict[str, Tensor | int]:
        state = super().state_dict()
        if self.average is not None:
            state["average"] = self.average
        return state


def exchange_if_due(role: WorkerRole, exchange: ExchangeFn) -> None:
    """The exchange that starts step t_i when t_i % tau == 0: send ``outgoing()``, apply the reply."""
    if role.due():
        reply = exchange(role.outgoing())
        if reply is not None:
            role.incoming(reply)


def worker_step(role: WorkerRole, gradient: GradientFn, exchange: ExchangeFn) -> float:
    """One step t_i of a worker: the exchange when due, then the gradient step. Returns the loss.

    Elastic workers take the gradient at the point from before the elastic move (the role keeps
    it); DOWNPOUR workers at the center they just pulled; MDOWNPOUR at the look-ahead received.
    """
    exchange_if_due(role, exchange)
    loss, grad = gradient(role.gradient_point())
    role.local_step(grad)
    return loss


def make_worker_role(config: AlgorithmConfig, params: Tensor, *, comm_period: int) -> WorkerRole:
    """The worker role of ``config.name`` starting from ``params``."""
    name = config.name
    if name in ("easgd", "eamsgd"):
        return ElasticWorker(
            params,
            comm_period=comm_period,
            learning_rate=config.learning_rate,
            momentum=config.momentum,
        )
    if name in ("downpour", "adownpour", "mvadownpour"):
        return DownpourWorker(params, comm_period=comm_period, learning_rate=config.learning_rate)
    if name == "mdownpour":
        if comm_period != 1:
            raise ValueError(f"mdownpour needs comm.period=1 (spec), got {comm_period}")
        return MDownpourWorker(params)
    return SequentialWorker(
        params,
        learning_rate=config.learning_rate,
        momentum=config.momentum,
        average=config.averages,
        average_rate=config.average_rate,
    )
