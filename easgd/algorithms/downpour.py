"""DOWNPOUR and its server-side variants (the paper's baselines).

DOWNPOUR: each worker accumulates its own SGD moves in ``accumulated``; every tau steps it pushes
the accumulation (the server adds it to the center) and pulls the center. MDOWNPOUR puts Nesterov
momentum on the server: workers send the gradient at the server's look-ahead point.
"""

from __future__ import annotations

import torch
from torch import Tensor

from easgd.algorithms.hyperparams import check_learning_rate, check_momentum


def downpour_local_step(
    params: Tensor, accumulated: Tensor, grad: Tensor, *, learning_rate: float
) -> tuple[Tensor, Tensor]:
    """x_i <- x_i - eta * g;  a_i <- a_i - eta * g.  Returns ``(new_params, new_accumulated)``."""
    check_learning_rate(learning_rate)
    move = learning_rate * grad
    return params - move, accumulated - move


def downpour_push(center: Tensor, accumulated: Tensor) -> Tensor:
    """Server side of a push: center <- center + a_i."""
    return center + accumulated


def downpour_pull(center: Tensor) -> tuple[Tensor, Tensor]:
    """Worker side after a push: x_i <- center, a_i <- 0.  Returns ``(new_params, new_accumulated)``."""
    return center.clone(), torch.zeros_like(center)


def mdownpour_lookahead(center: Tensor, velocity: Tensor, *, momentum: float) -> Tensor:
    """The point y = center + delta * v~ where MDOWNPOUR workers take their gradient."""
    check_momentum(momentum)
    return center + momentum * velocity


def mdownpour_server_step(
    center: Tensor,
    velocity: Tensor,
    grad_at_lookahead: Tensor,
    *,
    learning_rate: float,
    momentum: float,
) -> tuple[Tensor, Tensor]:
    """v~ <- delta * v~ - eta * g(y);  center <- center + v~.  Returns ``(new_center, new_velocity)``."""
    check_learning_rate(learning_rate)
    check_momentum(momentum)
    new_velocity = momentum * velocity - learning_rate * grad_at_lookahead
    return center + new_velocity, new_velocity
