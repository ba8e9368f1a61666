"""Elastic averaging: the force alpha * (x_i - center) and the two sides that apply it.

Synchronous EASGD updates all workers and the center from the same old values; the asynchronous
exchange (Algorithms 1 and 2) lets worker i and the server apply equal and opposite moves, so
center + sum_i x_i is conserved exactly ("elastic symmetry").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from easgd.algorithms.hyperparams import check_comm_period, check_learning_rate, check_moving_rate


def is_exchange_step(local_step: int, *, comm_period: int) -> bool:
    """A worker talks to the server when its own step counter is a multiple of tau (t = 0 too)."""
    check_comm_period(comm_period)
    return local_step % comm_period == 0


def elastic_difference(worker: Tensor, center: Tensor, *, moving_rate: float) -> Tensor:
    """e = alpha * (x_i - center), the elastic move of one exchange (alpha = 0 allowed here)."""
    check_moving_rate(moving_rate, allow_zero=True)
    return torch.sub(worker, center).mul_(moving_rate)  # one new tensor, scaled in place


def apply_to_worker(worker: Tensor, elastic_diff: Tensor) -> Tensor:
    """Worker side of the exchange: x_i <- x_i - e."""
    return worker - elastic_diff


def apply_to_center(center: Tensor, elastic_diff: Tensor) -> Tensor:
    """Server side of the exchange: center <- center + e (applied when e arrives)."""
    return center + elastic_diff


def elastic_exchange(
    worker: Tensor, center: Tensor, *, moving_rate: float
) -> tuple[Tensor, Tensor, Tensor]:
    """One whole asynchronous exchange against the center as read.

    Returns ``(new_worker, new_center, elastic_diff)``; ``new_center`` is what the server holds
    after applying ``elastic_diff`` to the value the worker read.
    """
    diff = elastic_difference(worker, center, moving_rate=moving_rate)
    return apply_to_worker(worker, diff), apply_to_center(center, diff), diff


def synchronous_easgd_step(
    workers: Sequence[Tensor],
    center: Tensor,
    grads: Sequence[Tensor],
    *,
    learning_rate: float,
    moving_rate: float,
) -> tuple[list[Tensor], Tensor]:
    """Synchronous EASGD: every worker and the center move together from the old values.

    x_i    <- x_i - eta * g_i(x_i) - alpha * (x_i - center)
    center <- center + alpha * sum_i (x_i_old - center)
    """
    check_learning_rate(learning_rate)
    if len(workers) != len(grads):
        raise ValueError(f"got {len(workers)} workers but {len(grads)} gradients")
    if not workers:
        raise ValueError("synchronous_easgd_step needs at least one worker")
    diffs = [elastic_difference(x, center, moving_rate=moving_rate) for x in workers]
    new_workers = [x - learning_rate * g - d for x, g, d in zip(workers, grads, diffs, strict=True)]
    new_center = center + sum(diffs[1:], diffs[0])
    return new_workers, new_center
