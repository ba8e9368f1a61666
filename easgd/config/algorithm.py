"""Typed schema of the ``algorithm/`` config group: which update rule, with which hyperparameters.

The same dataclass drives the simulator, the distributed runtime and Hydra (it is registered in
Hydra's ConfigStore by :mod:`easgd.config.store`), and ``__post_init__`` rejects bad values with a
message naming the key and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass

from easgd.algorithms.hyperparams import (
    check_average_rate,
    check_learning_rate,
    check_momentum,
    check_moving_rate,
    resolve_moving_rate,
)
from easgd.algorithms.periodic import (
    DILOCO_OUTER_LEARNING_RATE,
    DILOCO_OUTER_MOMENTUM,
    check_outer_learning_rate,
    check_outer_momentum,
)
from easgd.algorithms.registry import AlgorithmSpec, names, spec_of


@dataclass
class AlgorithmConfig:
    """One update rule of docs/algorithms.md and its hyperparameters."""

    name: str = "eamsgd"
    """One of easgd, eamsgd, downpour, adownpour, mvadownpour, mdownpour, localsgd, diloco, sgd,
    msgd, asgd, mvasgd."""
    learning_rate: float = 0.01
    """eta, the step size of every gradient step (worker or server)."""
    momentum: float = 0.0
    """delta, Nesterov momentum: on the worker (eamsgd, msgd, the inner step of localsgd and
    diloco) or the server (mdownpour); in [0, 1)."""
    moving_rate: float | None = None
    """alpha, the elastic moving rate in (0, 1); leave null to derive it as beta / num_workers."""
    beta: float = 0.9
    """beta = p * alpha (paper: 0.9), used when moving_rate is null."""
    average_rate: float | None = None
    """Rate of the average z of the evaluated variable: null = Polyak 1/s (adownpour, asgd), a
    constant in (0, 1] for the moving averages (mvadownpour, mvasgd; paper: 0.001)."""
    weight_decay: float = 0.0
    """L2 coefficient added to every gradient (g includes weight decay, as in the spec)."""
    outer_learning_rate: float | None = None
    """DiLoCo's outer rate lr_out, > 0; null = the paper's 0.7 (diloco only)."""
    outer_momentum: float | None = None
    """DiLoCo's outer Nesterov momentum mu in [0, 1); null = the paper's 0.9 (diloco only)."""

    def __post_init__(self) -> None:
        spec = self.spec  # an unknown name is refused here, with the known ones
        _prefixed(check_learning_rate, self.learning_rate)
        _prefixed(check_momentum, self.momentum)
        if self.momentum > 0 and not spec.momentum:
            raise ValueError(
                f"algorithm.momentum={self.momentum} has no effect for {self.name!r}; "
                f"momentum is used by {', '.join(names(worker_momentum=True) + names(server_momentum=True))} "
                "(set it to 0)"
            )
        if self.moving_rate is not None:
            _prefixed(check_moving_rate, self.moving_rate)
        if self.weight_decay < 0:
            raise ValueError(f"algorithm.weight_decay must be >= 0, got {self.weight_decay!r}")
        moving = names(average="moving")
        if self.average_rate is not None:
            _prefixed(check_average_rate, self.average_rate)
            if spec.average != "moving":
                raise ValueError(
                    f"algorithm.average_rate is only used by {' and '.join(moving)}, not {self.name!r}"
                )
        elif spec.average == "moving":
            raise ValueError(f"algorithm.average_rate must be set for {self.name} (paper: 0.001)")
        self._check_outer()

    def _check_outer(self) -> None:
        """The outer optimizer's keys: valid values, and set only for a rule that has one."""
        for key, value, check in (
            ("outer_learning_rate", self.outer_learning_rate, check_outer_learning_rate),
            ("outer_momentum", self.outer_momentum, check_outer_momentum),
        ):
            if value is None:
                continue
            if not self.spec.outer_optimizer:
                raise ValueError(
                    f"algorithm.{key}={value!r} has no effect for {self.name!r}; it is used by "
                    f"{', '.join(names(outer_optimizer=True))} (set it to null)"
                )
            _prefixed(check, value)

    @property
    def resolved_outer(self) -> tuple[float, float]:
        """(lr_out, mu) of the outer step: the configured values or DiLoCo's 0.7 and 0.9."""
        rate, momentum = self.outer_learning_rate, self.outer_momentum
        return (
            DILOCO_OUTER_LEARNING_RATE if rate is None else rate,
            DILOCO_OUTER_MOMENTUM if momentum is None else momentum,
        )

    @property
    def spec(self) -> AlgorithmSpec:
        """This rule's registry entry: its family and where it may run."""
        return spec_of(self.name)

    @property
    def uses_server(self) -> bool:
        """True for the parameter-server algorithms, False for the sequential (p = 1) baselines."""
        return self.spec.uses_server

    @property
    def elastic(self) -> bool:
        """True for the elastic family (easgd, eamsgd): a moving rate, overlap, all-reduce."""
        return self.spec.elastic

    @property
    def averages(self) -> bool:
        """True where the evaluated variable is an average z (adownpour, mvadownpour, asgd, mvasgd)."""
        return self.spec.average != "none"

    def resolved_moving_rate(self, num_workers: int) -> float:
        """alpha: moving_rate if given, else beta / num_workers."""
        try:
            return resolve_moving_rate(
                moving_rate=self.moving_rate,
                beta=None if self.moving_rate is not None else self.beta,
                num_workers=num_workers,
            )
        except ValueError as err:
            raise ValueError(f"algorithm: {err}") from None


def _prefixed(check: object, value: float) -> None:
    try:
        check(value)  # type: ignore[operator]
    except ValueError as err:
        raise ValueError(f"algorithm.{err}") from None
