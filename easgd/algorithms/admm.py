"""Round-robin ADMM, kept only for the paper's stability comparison with EASGD (Section 4).

At global step t only worker i = t mod p acts (lambda_i: its scaled dual variable, rho: penalty):

    lambda_i <- lambda_i - (x_i - center)
    x_i      <- x_i - eta * g(x_i) + eta * rho * (lambda_i_new - x_i + center)
    center   <- mean_j (x_j - lambda_j)           (over all workers, new values)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from easgd.algorithms.hyperparams import check_learning_rate


def admm_round_robin_step(
    workers: Sequence[Tensor],
    duals: Sequence[Tensor],
    center: Tensor,
    grad: Tensor,
    *,
    active: int,
    learning_rate: float,
    rho: float,
) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """One global step in which only worker ``active`` moves; ``grad`` is g at its x.

    Returns ``(new_workers, new_duals, new_center)``.
    """
    check_learning_rate(learning_rate)
    if rho < 0:
        raise ValueError(f"rho must be >= 0, got {rho!r}")
    if not 0 <= active < len(workers):
        raise ValueError(f"active must be in [0, {len(workers)}), got {active!r}")
    new_workers = list(workers)
    new_duals = list(duals)
    x = workers[active]
    new_dual = duals[active] - (x - center)
    new_duals[active] = new_dual
    new_workers[active] = x - learning_rate * grad + learning_rate * rho * (new_dual - x + center)
    new_center = torch.stack([w - d for w, d in zip(new_workers, new_duals, strict=True)]).mean(0)
    return new_workers, new_duals, new_center
