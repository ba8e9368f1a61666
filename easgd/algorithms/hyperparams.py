"""Validation of the hyperparameters shared by every update rule.

Each check raises ``ValueError`` naming the parameter, the value and the allowed range, so a bad
configuration is rejected before any process starts.
"""

from __future__ import annotations

import math

PAPER_BETA = 0.9
"""beta = p * alpha used in every experiment of the paper."""

PAPER_MOMENTUM = 0.99
"""delta used for every momentum method in the paper."""


def check_learning_rate(learning_rate: float) -> float:
    """Return ``learning_rate`` (eta) if it is finite and >= 0."""
    if not math.isfinite(learning_rate) or learning_rate < 0:
        raise ValueError(f"learning_rate must be a finite number >= 0, got {learning_rate!r}")
    return float(learning_rate)


def check_momentum(momentum: float) -> float:
    """Return ``momentum`` (delta) if it lies in [0, 1)."""
    if not (0.0 <= momentum < 1.0):
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    return float(momentum)


def check_moving_rate(moving_rate: float, *, allow_zero: bool = False) -> float:
    """Return ``moving_rate`` (alpha) if it lies in (0, 1).

    ``allow_zero`` admits alpha = 0, the decoupled limit (workers become independent SGD/MSGD):
    the pure math accepts it for analysis, a training run does not.
    """
    low_ok = moving_rate >= 0.0 if allow_zero else moving_rate > 0.0
    if not (low_ok and moving_rate < 1.0):
        allowed = "[0, 1)" if allow_zero else "(0, 1)"
        raise ValueError(
            f"moving_rate must be in {allowed}, got {moving_rate!r}; "
            "give it directly or as beta / num_workers (paper: beta = 0.9)"
        )
    return float(moving_rate)


def check_comm_period(comm_period: int) -> int:
    """Return ``comm_period`` (tau) if it is an integer >= 1."""
    if isinstance(comm_period, bool) or int(comm_period) != comm_period or comm_period < 1:
        raise ValueError(f"comm_period must be an integer >= 1, got {comm_period!r}")
    return int(comm_period)


def check_num_workers(num_workers: int) -> int:
    """Return ``num_workers`` (p) if it is an integer >= 1."""
    if isinstance(num_workers, bool) or int(num_workers) != num_workers or num_workers < 1:
        raise ValueError(f"num_workers must be an integer >= 1, got {num_workers!r}")
    return int(num_workers)


def check_average_rate(average_rate: float) -> float:
    """Return the rate of a moving average of the center if it lies in (0, 1]."""
    if not (0.0 < average_rate <= 1.0):
        raise ValueError(f"average_rate must be in (0, 1], got {average_rate!r}")
    return float(average_rate)


def moving_rate_from_beta(beta: float, num_workers: int) -> float:
    """alpha = beta / p: the paper keeps beta = p * alpha fixed (0.9) as p changes.

    Example::

        >>> moving_rate_from_beta(0.9, 4)
        0.225
    """
    check_num_workers(num_workers)
    if not (0.0 < beta < num_workers):
        raise ValueError(f"beta must be in (0, num_workers={num_workers}), got {beta!r}")
    return check_moving_rate(beta / num_workers)


def resolve_moving_rate(
    *, moving_rate: float | None, beta: float | None, num_workers: int
) -> float:
    """The moving rate given directly, or as ``beta / num_workers``; exactly one of the two."""
    if (moving_rate is None) == (beta is None):
        raise ValueError(
            "give exactly one of moving_rate (alpha) or beta (alpha = beta / num_workers); "
            f"got moving_rate={moving_rate!r}, beta={beta!r}"
        )
    if moving_rate is not None:
        return check_moving_rate(moving_rate)
    assert beta is not None
    return moving_rate_from_beta(beta, num_workers)
