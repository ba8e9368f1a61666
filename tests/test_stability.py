"""Round-robin stability on F(x) = x^2/2 (paper Section 4): EASGD's region and ADMM's divergence."""

from __future__ import annotations

import pytest
import torch

from easgd.config.algorithm import AlgorithmConfig
from easgd.sim import Quadratic, SimConfig, simulate
from easgd.sim.stability import (
    admm_round_robin_map,
    easgd_round_robin_map,
    easgd_stable_analytic,
    easgd_worker_matrix,
    simulate_rounds,
    spectral_radius,
)

MARGIN = 0.03


def boundary(eta: float) -> float:
    """alpha on the edge of the region: (4 - 2 eta) / (4 - eta)."""
    return (4 - 2 * eta) / (4 - eta)


def grid_points() -> list[tuple[float, float, bool]]:
    """(eta, alpha, stable) pairs at least MARGIN away from the boundary in alpha."""
    points = []
    for eta in [0.05, 0.3, 0.7, 1.0, 1.4, 1.8, 1.95]:
        edge = boundary(eta)
        for alpha in [0.02, 0.2, 0.5, 0.8, 0.95]:
            if abs(alpha - edge) >= MARGIN:
                points.append((eta, alpha, alpha < edge))
    points += [(2.1, 0.05, False), (2.5, 0.3, False)]  # eta > 2 is outside for every alpha
    return points


def test_one_worker_map_matches_the_spec_closed_form() -> None:
    for eta, alpha in [(0.1, 0.2), (1.5, 0.4), (0.0, 0.9)]:
        assert torch.allclose(easgd_round_robin_map(eta, alpha, 1), easgd_worker_matrix(eta, alpha))


@pytest.mark.parametrize("num_workers", [1, 3, 8])
def test_easgd_spectral_radius_matches_the_analytic_region(num_workers: int) -> None:
    for eta, alpha, stable in grid_points():
        assert easgd_stable_analytic(eta, alpha) == stable
        radius = spectral_radius(easgd_round_robin_map(eta, alpha, num_workers))
        assert (radius < 1.0) == stable, (eta, alpha, radius)


@pytest.mark.parametrize("num_workers", [1, 3, 8])
def test_easgd_simulated_iterates_match_the_analytic_region(num_workers: int) -> None:
    # The simulator's round-robin schedule runs the real worker/server roles on x^2/2.
    start = torch.tensor([1.0], dtype=torch.float64)
    for eta, alpha, stable in [
        (0.5, 0.5, True),
        (0.5, 0.9, False),
        (1.8, 0.1, True),
        (1.8, 0.2, False),
        (2.2, 0.05, False),
    ]:
        config = AlgorithmConfig(name="easgd", learning_rate=eta, moving_rate=alpha)
        sim = SimConfig(
            num_workers=num_workers,
            comm_period=1,
            schedule="round_robin",
            duration=600 * num_workers,
            eval_interval=600 * num_workers,
        )
        result = simulate(config, sim, Quadratic(start))
        size = max([result.evaluated.abs().item()] + [w.abs().item() for w in result.workers])
        assert (size < 1e-3) == stable, (eta, alpha, size)
        assert (size > 1.0) == (not stable), (eta, alpha, size)


@pytest.mark.parametrize("num_workers", [3, 8])
def test_round_robin_admm_diverges_where_easgd_converges(num_workers: int) -> None:
    eta, rho = 0.001, 2.5  # the paper's diverging example; EASGD uses alpha = eta * rho
    admm = admm_round_robin_map(eta, rho, num_workers)
    easgd = easgd_round_robin_map(eta, eta * rho, num_workers)
    assert spectral_radius(admm) > 1.0 > spectral_radius(easgd)
    rounds = 20_000
    assert simulate_rounds(admm, rounds) > 10.0
    assert simulate_rounds(easgd, rounds) < 0.5
