"""Local (single-variable) steps: SGD and Nesterov momentum, as in EASGD/EAMSGD and MSGD.

All functions are pure: they take tensors and return new tensors, never modifying their inputs.
Weight decay, when configured, is already part of ``grad`` (spec: "weight decay included in g").
"""

from __future__ import annotations

from torch import Tensor

from easgd.algorithms.hyperparams import check_learning_rate, check_momentum


def sgd_step(params: Tensor, grad: Tensor, *, learning_rate: float) -> Tensor:
    """x <- x - eta * g(x)."""
    check_learning_rate(learning_rate)
    return params - learning_rate * grad


def nesterov_lookahead(params: Tensor, velocity: Tensor, *, momentum: float) -> Tensor:
    """The point where EAMSGD/MSGD take the gradient: x + delta * v (``params`` itself if delta = 0)."""
    check_momentum(momentum)
    return params if momentum == 0 else params + momentum * velocity


def nesterov_step(
    params: Tensor,
    velocity: Tensor,
    grad_at_lookahead: Tensor,
    *,
    learning_rate: float,
    momentum: float,
) -> tuple[Tensor, Tensor]:
    """EAMSGD's local step (Algorithm 2) and sequential MSGD.

        v <- delta * v - eta * g(x + delta * v)
        x <- x + v

    ``grad_at_lookahead`` must be the gradient at :func:`nesterov_lookahead`. With momentum 0 this
    is exactly :func:`sgd_step`. Returns ``(new_params, new_velocity)``.
    """
    check_learning_rate(learning_rate)
    check_momentum(momentum)
    new_velocity = momentum * velocity - learning_rate * grad_at_lookahead
    return params + new_velocity, new_velocity
