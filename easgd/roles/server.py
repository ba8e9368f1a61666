"""What the parameter server does with each message, apart from how messages travel.

A server role holds the center (and MDOWNPOUR's velocity v~, or the average z) and answers one
worker message with :meth:`ServerRole.handle`. The caller serialises calls (the runtime holds a
lock): the conservation of center + sum of workers depends on it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from easgd import algorithms as alg
from easgd.config.algorithm import AlgorithmConfig
from easgd.roles.state import restore


class ServerRole(ABC):
    """The center variable and the server-side rule of one algorithm."""

    def __init__(self, center: Tensor) -> None:
        self.center = center.detach().clone()
        self.updates = 0
        """Server clock s: how many center updates so far."""

    @abstractmethod
    def handle(self, worker: int, payload: Tensor | None) -> Tensor:
        """Apply one worker's payload and return the reply for that worker."""

    @abstractmethod
    def update_norm(self, payload: Tensor) -> float:
        """Norm of the change ``handle(payload)`` would make to the center (divergence guard)."""

    def evaluated(self) -> Tensor:
        """The variable that is tested and checkpointed: the center (z for averaging variants)."""
        return self.center

    def state_dict(self) -> dict[str, Tensor | int]:
        """Every server variable, for checkpoints."""
        return {"center": self.center, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Tensor | int]) -> None:
        """Restore what :meth:`state_dict` returned."""
        restore(self, state)


class ElasticServer(ServerRole):
    """EASGD/EAMSGD: receives x_i, computes e = alpha (x_i - center), applies it, replies e."""

    def __init__(self, center: Tensor, *, moving_rate: float) -> None:
        super().__init__(center)
        self.moving_rate = alg.hyperparams.check_moving_rate(moving_rate)

    def handle(self, worker: int, payload: Tensor | None) -> Tensor:
        if payload is None:
            raise ValueError(f"worker {worker} sent no parameters to an elastic exchange")
        diff = alg.elastic_difference(payload, self.center, moving_rate=self.moving_rate)
        self.apply(diff)
        return diff

    def update_norm(self, payload: Tensor) -> float:
        return self.moving_rate * float((payload - self.center).norm())

    def apply(self, elastic_diff: Tensor) -> None:
        """center <- center + e (also used by the simulator when e arrives late)."""
        self.center = alg.apply_to_center(self.center, elastic_diff)
        self.updates += 1


class DownpourServer(ServerRole):
    """DOWNPOUR (+ ADOWNPOUR / MVADOWNPOUR average z): adds a_i to the center, replies the center."""

    def __init__(
        self, center: Tensor, *, average: bool = False, average_rate: float | None = None
    ) -> None:
        super().__init__(center)
        self.average: Tensor | None = self.center.clone() if average else None
        self.average_rate = average_rate

    def handle(self, worker: int, payload: Tensor | None) -> Tensor:
        if payload is None:
            raise ValueError(f"worker {worker} sent no accumulated update to DOWNPOUR")
        self.center = alg.downpour_push(self.center, payload)
        self.updates += 1
        if self.average is not None:
            rate = alg.average_rate(self.updates, constant_rate=self.average_rate)
            self.average = alg.running_average(self.average, self.center, rate=rate)
        return self.center  # never modified in place: the next push makes a new tensor

    def update_norm(self, payload: Tensor) -> float:
        return float(payload.norm())

    def evaluated(self) -> Tensor:
        return self.center if self.average is None else self.average

    def state_dict(self) -> dict[str, Tensor | int]:
        state = super().state_dict()
        if self.average is not None:
            state["average"] = self.average
        return state


class MDownpourServer(ServerRole):
    """MDOWNPOUR: Nesterov momentum on the server; receives g(y), replies the new look-ahead y."""

    def __init__(self, center: Tensor, *, learning_rate: float, momentum: float) -> None:
        super().__init__(center)
        self.velocity = torch.zeros_like(self.center)
        self.learning_rate = learning_rate
        self.momentum = momentum

    def handle(self, worker: int, payload: Tensor | None) -> Tensor:
        if payload is not None:
            self.center, self.velocity = alg.mdownpour_server_step(
                self.center,
                self.velocity,
                payload,
                learning_rate=self.learning_rate,
                momentum=self.momentum,
            )
            self.updates += 1
        return alg.mdownpour_lookahead(self.center, self.velocity, momentum=self.momentum)

    def update_norm(self, payload: Tensor) -> float:
        return self.learning_rate * float(payload.norm())

    def state_dict(self) -> dict[str, Tensor | int]:
        return {**super().state_dict(), "velocity": self.velocity}


def make_server_role(config: AlgorithmConfig, center: Tensor, *, num_workers: int) -> ServerRole:
    """The server role of ``config.name`` holding ``center``."""
    name = config.name
    if name in ("easgd", "eamsgd"):
        return ElasticServer(center, moving_rate=config.resolved_moving_rate(num_workers))
    if name in ("downpour", "adownpour", "mvadownpour"):
        return DownpourServer(center, average=name != "downpour", average_rate=config.average_rate)
    if name == "mdownpour":
        return MDownpourServer(center, learning_rate=config.learning_rate, momentum=config.momentum)
    raise ValueError(f"{name!r} runs without a server (sequential baseline)")
