"""Periodic model averaging: local SGD and DiLoCo, the methods people pick instead of EASGD.

Notation of docs/algorithms.md: p workers, worker i holds x_i (and a Nesterov velocity
v_i for an inner momentum step), the center x~ is replicated on every rank (or kept by the
simulator's server), tau (DiLoCo's H) local steps between averaging rounds.

Local SGD / periodic model averaging (PyTorch's ``PeriodicModelAverager`` and
``PostLocalSGDOptimizer``; torchft's ``LocalSGD``)::

    each step:       x_i <- inner step of x_i   (SGD or Nesterov; v_i stays local, untouched)
    every tau steps: x_i <- x~ = (1/p) sum_j x_j

DiLoCo (Douillard et al. 2023, arXiv 2311.08105, Algorithm 1)::

    each step:       x_i <- inner step of x_i   (H steps; AdamW in the paper, any optimizer)
    every H steps:   Delta = x~ - (1/p) sum_j x_j            (the outer pseudo-gradient)
                     m     = mu m + Delta                    (outer Nesterov momentum, m_0 = 0)
                     x~    = x~ - lr_out (Delta + mu m)
                     x_i  <- x~                              (inner optimizer state stays local)

The outer step is ``torch.optim.SGD(lr=lr_out, momentum=mu, nesterov=True)`` with Delta written
into ``.grad`` (paper: lr_out = 0.7, mu = 0.9). With H = 1, lr_out = 1 and mu = 0 DiLoCo is
synchronous data-parallel SGD on the averaged gradient: x~ <- x~ - eta (1/p) sum_j g_j(x~).

Schedule: as for every rule of the harness, a round starts step t when t % tau == 0, t = 0
included (where it averages p equal copies: a no-op for local SGD, Delta = 0 for DiLoCo when p
is a power of two). Averaging at the start of step t is averaging after step t - 1, i.e. after
every tau-th local step: ``PeriodicModelAverager(period=tau, warmup_steps=tau - 1)``.

The mean is the sum (an all-reduce) divided by p. Torch's averager divides each x_j by p before
summing; for p a power of two the two are the same bits (division by 2^k is exact).

Pure functions return new tensors; the ``*_`` functions overwrite their first arguments (the
runtime's hot path) and are tested equal to the pure ones. Never imports ``torch.distributed``:
the sum over workers is passed in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from easgd.algorithms.hyperparams import check_momentum, check_num_workers

DILOCO_OUTER_LEARNING_RATE = 0.7
"""DiLoCo's outer learning rate (paper, Section 3)."""

DILOCO_OUTER_MOMENTUM = 0.9
"""DiLoCo's outer Nesterov momentum (paper, Section 3)."""


def check_outer_learning_rate(outer_learning_rate: float) -> float:
    """Return lr_out if it is finite and > 0 (0 would freeze the center forever)."""
    if not math.isfinite(outer_learning_rate) or outer_learning_rate <= 0:
        raise ValueError(
            f"outer_learning_rate must be a finite number > 0, got {outer_learning_rate!r} "
            f"(DiLoCo: {DILOCO_OUTER_LEARNING_RATE})"
        )
    return float(outer_learning_rate)


def check_outer_momentum(outer_momentum: float) -> float:
    """Return mu if it lies in [0, 1)."""
    try:
        return check_momentum(outer_momentum)
    except ValueError:
        raise ValueError(
            f"outer_momentum must be in [0, 1), got {outer_momentum!r} "
            f"(DiLoCo: {DILOCO_OUTER_MOMENTUM})"
        ) from None


# -- pure rules ---------------------------------------------------------------------------------
def worker_average(workers: Sequence[Tensor]) -> Tensor:
    """(1/p) sum_j x_j, summed in worker order (the order of the simulator and the all-reduce)."""
    check_num_workers(len(workers))
    return sum(workers[1:], workers[0]) / len(workers)


def localsgd_round(workers: Sequence[Tensor]) -> Tensor:
    """Local SGD's round: the point every worker (and the center) takes, (1/p) sum_j x_j."""
    return worker_average(workers)


def pseudo_gradient(center: Tensor, average: Tensor) -> Tensor:
    """DiLoCo's Delta = x~ - (1/p) sum_j x_j: how far the round moved the workers, reversed."""
    return center - average


def outer_nesterov_step(
    center: Tensor,
    momentum_buffer: Tensor,
    pseudo_grad: Tensor,
    *,
    outer_learning_rate: float,
    outer_momentum: float,
) -> tuple[Tensor, Tensor]:
    """m <- mu m + Delta;  x~ <- x~ - lr_out (Delta + mu m). Returns ``(new_center, new_m)``.

    torch.optim.SGD(nesterov=True, dampening=0) on the first step sets m = Delta, which is
    mu * 0 + Delta: the buffer starting at 0 is the same rule.
    """
    check_outer_learning_rate(outer_learning_rate)
    check_outer_momentum(outer_momentum)
    new_buffer = outer_momentum * momentum_buffer + pseudo_grad
    return center - outer_learning_rate * (pseudo_grad + outer_momentum * new_buffer), new_buffer


def diloco_round(
    workers: Sequence[Tensor],
    center: Tensor,
    momentum_buffer: Tensor,
    *,
    outer_learning_rate: float,
    outer_momentum: float,
) -> tuple[Tensor, Tensor]:
    """DiLoCo's round: ``(new_center, new_m)``; every worker then restarts from ``new_center``."""
    delta = pseudo_gradient(center, worker_average(workers))
    return outer_nesterov_step(
        center,
        momentum_buffer,
        delta,
        outer_learning_rate=outer_learning_rate,
        outer_momentum=outer_momentum,
    )


# -- in place, from the sum over workers (what an all-reduce returns) ---------------------------
def localsgd_round_(center: Tensor, summed: Tensor, *, num_workers: int) -> None:
    """center <- summed / p (writes ``center``)."""
    torch.div(summed, num_workers, out=center)


def diloco_round_(
    center: Tensor,
    momentum_buffer: Tensor,
    summed: Tensor,
    scratch: Tensor,
    *,
    num_workers: int,
    outer_learning_rate: float,
    outer_momentum: float,
) -> None:
    """The DiLoCo round from ``summed`` = sum_j x_j (writes ``center``, ``momentum_buffer`` and
    ``scratch``, which ends holding Delta + mu m; ``summed`` is only read).

    The same operations in the same order as :func:`diloco_round`, so the same bits.
    """
    torch.div(summed, num_workers, out=scratch)  # mean
    torch.sub(center, scratch, out=scratch)  # Delta = x~ - mean
    momentum_buffer.mul_(outer_momentum).add_(scratch)  # m = mu m + Delta
    scratch.add_(momentum_buffer * outer_momentum)  # Delta + mu m
    center.sub_(scratch * outer_learning_rate)  # x~ - lr_out (Delta + mu m)
