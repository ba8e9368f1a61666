"""Stability of round-robin EASGD and ADMM on F(x) = x^2 / 2 (paper, Section 4).

On this quadratic every update is linear, so one round (each of the p workers acting once, in
turn) is a matrix. The matrices here are built by applying the library's own update functions to
the basis vectors, so their spectral radius judges the code, not a transcription of it; the
closed forms from the spec are kept separately for the tests to compare against.
"""

from __future__ import annotations

import torch
from torch import Tensor

from easgd import algorithms as alg


def easgd_worker_matrix(learning_rate: float, moving_rate: float) -> Tensor:
    """The spec's closed form of one worker's map on (x_i, center): [[1-eta-alpha, alpha], [alpha, 1-alpha]]."""
    eta, alpha = learning_rate, moving_rate
    return torch.tensor([[1 - eta - alpha, alpha], [alpha, 1 - alpha]], dtype=torch.float64)


def easgd_stable_analytic(learning_rate: float, moving_rate: float) -> bool:
    """The paper's condition: 0 <= eta <= 2 and 0 <= alpha <= (4 - 2 eta) / (4 - eta)."""
    eta, alpha = learning_rate, moving_rate
    return 0 <= eta <= 2 and 0 <= alpha <= (4 - 2 * eta) / (4 - eta)


def _easgd_round_robin_tick(
    state: Tensor, active: int, learning_rate: float, moving_rate: float
) -> Tensor:
    """One global step of round-robin EASGD (tau = 1) on state (x_1..x_p, center), via the library."""
    num_workers = state.numel() - 1
    x, center = state[active : active + 1], state[num_workers:]
    moved, new_center, _ = alg.elastic_exchange(x, center, moving_rate=moving_rate)
    grad = x  # F(x) = x^2 / 2, gradient at the value before the elastic move
    new_x = alg.sgd_step(moved, grad, learning_rate=learning_rate)
    out = state.clone()
    out[active] = new_x[0]
    out[num_workers] = new_center[0]
    return out


def easgd_round_robin_map(learning_rate: float, moving_rate: float, num_workers: int) -> Tensor:
    """Matrix of one full round (workers 0..p-1 acting in turn) of round-robin EASGD."""
    size = num_workers + 1
    columns = []
    for basis in torch.eye(size, dtype=torch.float64):
        state = basis
        for active in range(num_workers):
            state = _easgd_round_robin_tick(state, active, learning_rate, moving_rate)
        columns.append(state)
    return torch.stack(columns, dim=1)


def admm_round_robin_map(learning_rate: float, rho: float, num_workers: int) -> Tensor:
    """Matrix of one full round of round-robin ADMM on state (x_1..x_p, lambda_1..lambda_p, center)."""
    p = num_workers
    size = 2 * p + 1
    columns = []
    for basis in torch.eye(size, dtype=torch.float64):
        workers = [basis[i : i + 1] for i in range(p)]
        duals = [basis[p + i : p + i + 1] for i in range(p)]
        center = basis[2 * p :]
        for active in range(p):
            workers, duals, center = alg.admm_round_robin_step(
                workers,
                duals,
                center,
                workers[active],  # gradient of x^2/2 at x_i
                active=active,
                learning_rate=learning_rate,
                rho=rho,
            )
        columns.append(torch.cat([*workers, *duals, center]))
    return torch.stack(columns, dim=1)


def spectral_radius(matrix: Tensor) -> float:
    """Largest absolute eigenvalue."""
    return float(torch.linalg.eigvals(matrix).abs().max())


def simulate_rounds(matrix: Tensor, rounds: int, *, seed: int = 0) -> float:
    """Norm of the state after ``rounds`` applications of ``matrix`` from a random unit start."""
    generator = torch.Generator().manual_seed(seed)
    state = torch.randn(matrix.shape[0], dtype=torch.float64, generator=generator)
    state = state / state.norm()
    for _ in range(rounds):
        state = matrix @ state
    return float(state.norm())
