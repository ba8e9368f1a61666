"""easgd.analysis against closed forms: quadratics of known curvature, an independently computed
Hessian of a small network, and probes checked against hand-derived trajectories."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from easgd.analysis import (
    Diverged,
    ExchangeProbe,
    ProbedObjective,
    TargetReached,
    classifier_loss,
    filter_groups,
    hessian_vector_product,
    perturbation_loss_increase,
    top_hessian_eigenvalue,
)
from easgd.config.algorithm import AlgorithmConfig
from easgd.data import load_digits_split
from easgd.flat import FlatModel
from easgd.models import MLP
from easgd.sim import ClassifierObjective, Quadratic, SimConfig, Simulator

D = torch.float64


def dense_quadratic(eigenvalues: list[float], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A symmetric H = Q diag(eigenvalues) Q^T with a random rotation Q, and Q."""
    n = len(eigenvalues)
    q, _ = torch.linalg.qr(
        torch.randn(n, n, dtype=D, generator=torch.Generator().manual_seed(seed))
    )
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=D)) @ q.T, q


def test_hessian_vector_product_of_a_quadratic_is_h_times_v() -> None:
    h, _ = dense_quadratic([4.0, 3.0, -1.0, 0.5, 2.0])
    loss = lambda x: 0.5 * x @ h @ x + x.sum()  # noqa: E731 - the linear term has no curvature
    v = torch.arange(1.0, 6.0, dtype=D)
    x = torch.randn(5, dtype=D)
    assert torch.allclose(hessian_vector_product(loss, x, v), h @ v, atol=1e-12)


def test_power_iteration_finds_the_top_eigenvalue_and_vector_of_a_rotated_quadratic() -> None:
    eigenvalues = [7.0, 3.0, 2.5, 1.0, 0.2, 0.1]
    h, q = dense_quadratic(eigenvalues, seed=1)
    loss = lambda x: 0.5 * x @ h @ x  # noqa: E731
    top = top_hessian_eigenvalue(
        loss, torch.ones(6, dtype=D), tolerance=1e-10, iterations=200,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert top.converged
    assert top.eigenvalue == pytest.approx(7.0, rel=1e-6)
    assert abs(float(top.vector @ q[:, 0])) == pytest.approx(1.0, abs=1e-5)


def test_power_iteration_on_a_network_matches_the_full_hessian() -> None:
    """A 2-layer net small enough to form its Hessian: the dominant eigenvalue agrees."""
    torch.manual_seed(3)
    module = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    inputs = torch.randn(32, 3, dtype=D)
    targets = torch.randint(0, 3, (32,))
    loss = classifier_loss(module, inputs, targets)
    point = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    eigenvalues = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, point))
    dominant = float(eigenvalues[eigenvalues.abs().argmax()])
    top = top_hessian_eigenvalue(loss, point, iterations=500, tolerance=1e-12)
    assert top.eigenvalue == pytest.approx(dominant, rel=1e-4)


def test_classifier_loss_agrees_with_flat_model_loss_and_gradient() -> None:
    """Same parameter order as FlatModel: value and gradient at the same point are equal."""
    torch.manual_seed(0)
    module = MLP((8,), 3, (5,))
    inputs, targets = torch.randn(16, 8), torch.randint(0, 3, (16,))
    flat = FlatModel(module)
    point = flat.initial_point() + 0.1 * torch.randn(flat.num_params)
    value, grad = flat.loss_and_grad(point, inputs, targets)
    x = point.clone().requires_grad_(True)
    loss = classifier_loss(module, inputs, targets)(x)
    (autograd_grad,) = torch.autograd.grad(loss, x)
    assert float(loss.detach()) == pytest.approx(value, rel=1e-6)
    assert torch.allclose(autograd_grad, grad, atol=1e-6)


def test_isotropic_quadratic_gives_the_exact_perturbation_increase() -> None:
    """H = c I at its minimum: every direction of relative size r raises L by c r^2 ||x||^2 / 2."""
    c, minimum = 3.0, torch.tensor([1.0, -2.0, 0.5, 4.0], dtype=D)
    loss = lambda x: 0.5 * c * ((x - minimum) ** 2).sum()  # noqa: E731
    radii = [0.01, 0.1, 0.5]
    got = perturbation_loss_increase(
        loss, minimum, radii, samples=3, generator=torch.Generator().manual_seed(0)
    )
    norm2 = float(minimum @ minimum)
    assert got == pytest.approx([0.5 * c * r * r * norm2 for r in radii], rel=1e-10)


def test_anisotropic_quadratic_matches_half_r2_norm2_trace_over_n_in_expectation() -> None:
    """At the minimum x of 1/2 (y - x)^T H (y - x): E[L(x + d) - L(x)] = r^2 ||x||^2 tr(H) / (2 n),
    since E[u u^T / ||u||^2] = I / n for Gaussian u."""
    n = 40
    curvature = torch.linspace(0.1, 5.0, n, dtype=D)
    point = torch.randn(n, dtype=D, generator=torch.Generator().manual_seed(1))
    loss = lambda y: 0.5 * (curvature * (y - point) ** 2).sum()  # noqa: E731
    radii = [0.05, 0.2]
    got = perturbation_loss_increase(
        loss, point, radii, samples=4000, generator=torch.Generator().manual_seed(2)
    )
    norm2 = float(point @ point)
    expected = [0.5 * r * r * norm2 * float(curvature.sum()) / n for r in radii]
    # the standard error of the mean is about 0.4 % here; a wrong scale (n, r, ||x||) is not 3 %
    assert got == pytest.approx(expected, rel=0.03)


def test_filter_scaling_gives_each_group_its_own_relative_size() -> None:
    """Groups of different curvature (c_k I within group k), at the minimum x: the increase is
    exactly r^2 / 2 * sum_k c_k ||x_k||^2, whatever the random directions (relative scaling of the
    whole vector would depend on how the direction falls across the groups)."""
    sizes, scales = [3, 2, 4], [1.0, 10.0, 0.1]
    curvature = torch.cat(
        [torch.full((s,), c, dtype=D) for s, c in zip(sizes, scales, strict=True)]
    )
    point = torch.tensor([1.0, 2.0, 2.0, 0.1, 0.2, 5.0, 5.0, 5.0, 5.0], dtype=D)
    loss = lambda x: 0.5 * (curvature * (x - point) ** 2).sum()  # noqa: E731
    got = perturbation_loss_increase(
        loss, point, [0.1, 0.3], samples=2, scaling="filter", group_sizes=sizes,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    quad = sum(c * float(p @ p) for p, c in zip(point.split(sizes), scales, strict=True))
    assert got == pytest.approx([0.5 * r * r * quad for r in (0.1, 0.3)], rel=1e-10)
    relative = perturbation_loss_increase(
        loss, point, [0.1], samples=2, generator=torch.Generator().manual_seed(0)
    )
    assert relative[0] != pytest.approx(got[0], rel=0.05)


def test_filter_groups_follow_rows_of_each_weight_and_whole_biases() -> None:
    module = nn.Sequential(nn.Conv1d(2, 5, 3), nn.Flatten(), nn.Linear(5, 4))
    assert filter_groups(module) == [6] * 5 + [5] + [5] * 4 + [4]
    point = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    norms = [float(g.norm()) for g in point.split(filter_groups(module))]
    conv_rows = module[0].weight.detach().reshape(5, -1).norm(dim=1)
    assert norms[:5] == pytest.approx(conv_rows.tolist())


def test_perturbation_rejects_bad_arguments_with_the_fix() -> None:
    loss = lambda x: (x * x).sum()  # noqa: E731
    x = torch.ones(3)
    with pytest.raises(ValueError, match="filter_groups"):
        perturbation_loss_increase(loss, x, [0.1], scaling="filter")
    with pytest.raises(ValueError, match="allowed: relative, filter"):
        perturbation_loss_increase(loss, x, [0.1], scaling="layer")
    with pytest.raises(ValueError, match="radii"):
        perturbation_loss_increase(loss, x, [-0.1])


def test_exchange_probe_measures_the_travel_of_downpour_on_a_quadratic() -> None:
    """One DOWNPOUR worker on F = |x|^2 / 2 without noise: it pulls c, takes tau steps of
    x <- (1 - eta) x, pushes; so exchange k + 1 sees travel (1 - (1 - eta)^tau) (1 - eta)^(tau k) |x0|."""
    eta, tau, x0 = 0.1, 5, torch.tensor([3.0, 4.0], dtype=D)
    algorithm = AlgorithmConfig("downpour", learning_rate=eta)
    config = SimConfig(num_workers=1, comm_period=tau, duration=30, eval_interval=100)
    sim = Simulator(algorithm, config, Quadratic(x0))
    probe = ExchangeProbe(sim.workers)
    result = sim.run()
    shrink = (1 - eta) ** tau
    expected = [(1 - shrink) * shrink**k * 5.0 for k in range(len(probe.travel[0]))]
    assert len(expected) == 30 // tau - 1
    assert probe.travel[0] == pytest.approx(expected, rel=1e-12)
    # the probe only watches: the same run without it ends at the bit-identical center
    plain = Simulator(algorithm, config, Quadratic(x0)).run()
    assert torch.equal(result.evaluated, plain.evaluated)


@pytest.fixture(scope="module")
def digits_objective() -> ClassifierObjective:
    split = load_digits_split(seed=0)
    torch.manual_seed(0)
    return ClassifierObjective(MLP(split.input_shape, split.num_classes, (16,)), split)


def test_probed_objective_stops_at_the_first_evaluation_below_the_target(
    digits_objective: ClassifierObjective,
) -> None:
    target = 1.0
    probed = ProbedObjective(digits_objective, stop_train_loss=target)
    algorithm = AlgorithmConfig("easgd", learning_rate=0.1)
    sim = Simulator(algorithm, SimConfig(num_workers=2, duration=2000, eval_interval=10), probed)
    probed.attach(sim)
    with pytest.raises(TargetReached) as hit:
        sim.run()
    record = hit.value.record
    assert record.train_loss <= target < probed.records[-2].train_loss
    assert record.time == probed.records[-1].time < 2000
    split = digits_objective.split
    again = digits_objective.flat.evaluate(hit.value.point, split.train_x, split.train_y)
    assert again["test_loss"] == pytest.approx(record.train_loss, rel=1e-6)
    assert torch.equal(hit.value.point, sim.server.center)  # type: ignore[union-attr]
    distances = [float((role.params - sim.server.center).norm()) for role in sim.workers]  # type: ignore[union-attr]
    assert record.worker_distance == pytest.approx(sum(distances) / 2, rel=1e-6)
    assert probed.records[0].worker_distance == 0.0  # everyone starts at the center
    assert record.steps == sum(role.step for role in sim.workers)


def test_probed_objective_stops_a_diverging_run(digits_objective: ClassifierObjective) -> None:
    probed = ProbedObjective(digits_objective)
    algorithm = AlgorithmConfig("msgd", learning_rate=1e30, momentum=0.99)
    sim = Simulator(
        algorithm, SimConfig(num_workers=1, duration=2000, eval_interval=5), probed
    )  # fmt: skip
    probed.attach(sim)
    with pytest.raises(Diverged) as stop:
        sim.run()
    assert not bool(torch.isfinite(stop.value.point).all())
    assert math.isnan(stop.value.record.worker_distance)  # sequential: no center to compare
    assert stop.value.record.time < 2000
