"""Averages of the center (ADOWNPOUR, MVADOWNPOUR) or of the iterate (ASGD, MVASGD).

After every update s = 1, 2, ...:  z <- (1 - a_s) z + a_s x, with a_s = 1/s (Polyak average) or a
constant rate (moving average, 0.001 in the paper).
"""

from __future__ import annotations

from torch import Tensor

from easgd.algorithms.hyperparams import check_average_rate


def polyak_rate(update_count: int) -> float:
    """a_s = 1 / s for the s-th update (s >= 1); the first update copies x into z."""
    if update_count < 1:
        raise ValueError(f"update_count must be >= 1, got {update_count!r}")
    return 1.0 / update_count


def running_average(average: Tensor, value: Tensor, *, rate: float) -> Tensor:
    """z <- (1 - rate) * z + rate * x."""
    check_average_rate(rate)
    return (1.0 - rate) * average + rate * value


def average_rate(update_count: int, *, constant_rate: float | None) -> float:
    """The rate a_s: Polyak's 1/s when ``constant_rate`` is None, else the constant."""
    return polyak_rate(update_count) if constant_rate is None else check_average_rate(constant_rate)
