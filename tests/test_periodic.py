"""Local SGD and DiLoCo (easgd/algorithms/periodic.py): the rules against hand-computed float64
values and torch's own optimizer, the reductions the DiLoCo paper states, a closed form, and the
configuration refusals. Every expected value is computed here, not read back from the code."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from easgd.algorithms import periodic
from easgd.config.algorithm import AlgorithmConfig
from easgd.config.schema import TrainConfig
from easgd.roles.averaging import AveragingCenter
from easgd.sim import Quadratic, SimConfig, simulate
from tests.conftest import f64


def test_localsgd_round_is_the_mean_of_the_workers() -> None:
    workers = [f64(1.0, -2.0), f64(3.0, 4.0), f64(-1.0, 1.0)]
    assert torch.equal(periodic.localsgd_round(workers), f64(1.0, 1.0))


def test_diloco_round_hand_computed() -> None:
    # x~ = 1, workers 0.5 and 0.0: mean 0.25, Delta = 0.75; mu = 0.5, m = 0.75,
    # x~ = 1 - 0.4 (0.75 + 0.5 * 0.75) = 1 - 0.45 = 0.55
    center, buffer = periodic.diloco_round(
        [f64(0.5), f64(0.0)],
        f64(1.0),
        f64(0.0),
        outer_learning_rate=0.4,
        outer_momentum=0.5,
    )
    assert float(buffer) == pytest.approx(0.75, abs=1e-15)
    assert float(center) == pytest.approx(0.55, abs=1e-15)
    # second round from x~ = 0.55 with workers 0.35 and 0.15: mean 0.25, Delta = 0.3,
    # m = 0.5 * 0.75 + 0.3 = 0.675, x~ = 0.55 - 0.4 (0.3 + 0.3375) = 0.295
    center, buffer = periodic.diloco_round(
        [f64(0.35), f64(0.15)], center, buffer, outer_learning_rate=0.4, outer_momentum=0.5
    )
    assert float(buffer) == pytest.approx(0.675, abs=1e-15)
    assert float(center) == pytest.approx(0.295, abs=1e-15)


def test_outer_step_is_torch_sgd_nesterov_on_the_pseudo_gradient() -> None:
    generator = torch.Generator().manual_seed(3)
    center = torch.randn(6, dtype=torch.float64, generator=generator)
    reference = torch.nn.Parameter(center.clone())
    outer = torch.optim.SGD([reference], lr=0.7, momentum=0.9, nesterov=True)
    buffer = torch.zeros_like(center)
    for _ in range(5):
        workers = [center + 0.1 * torch.randn(6, generator=generator, dtype=torch.float64)]
        workers.append(center - 0.3 * torch.randn(6, generator=generator, dtype=torch.float64))
        reference.grad = (reference.detach() - (workers[0] + workers[1]) / 2).clone()
        outer.step()
        center, buffer = periodic.diloco_round(
            workers, center, buffer, outer_learning_rate=0.7, outer_momentum=0.9
        )
        assert torch.allclose(center, reference.detach(), rtol=0, atol=1e-14)


@pytest.mark.parametrize("outer", [None, (0.7, 0.9), (1.3, 0.0)])
def test_in_place_round_equals_the_pure_rule_bit_for_bit(outer: tuple[float, float] | None) -> None:
    generator = torch.Generator().manual_seed(5)
    start = torch.randn(300, dtype=torch.float64, generator=generator)
    rate, momentum = outer or (None, None)
    rule = AveragingCenter(
        start.clone(), num_workers=3, outer_learning_rate=rate, outer_momentum=momentum
    )
    center, buffer = start.clone(), torch.zeros_like(start)
    for _ in range(4):
        workers = [center + torch.randn(300, dtype=torch.float64, generator=generator)] * 3
        workers = [w + i for i, w in enumerate(workers)]
        rule.apply_sum(workers[0] + workers[1] + workers[2], measure=True)
        old = center
        if outer is None:
            center = periodic.localsgd_round(workers)
        else:
            center, buffer = periodic.diloco_round(
                workers, center, buffer, outer_learning_rate=rate, outer_momentum=momentum
            )
        assert torch.equal(rule.center, center)
        assert rule.last_update_norm == pytest.approx(float((center - old).norm()), rel=1e-12)


class ConstantGradient:
    """F(x) = g . x: the gradient is g everywhere (no noise)."""

    def __init__(self, start: Tensor, grad: Tensor) -> None:
        self.start, self.grad = start, grad

    def initial_point(self) -> Tensor:
        return self.start.clone()

    def gradient(self, point: Tensor, generator: torch.Generator) -> tuple[float, Tensor]:
        return float(self.grad @ point), self.grad.clone()

    def evaluate(self, point: Tensor) -> dict[str, float]:
        return {"test_loss": float(self.grad @ point), "test_error": 0.0}


@pytest.mark.parametrize(("outer_momentum", "rounds"), [(0.9, 7), (0.5, 3), (0.0, 4)])
def test_diloco_center_after_k_rounds_of_a_constant_gradient_matches_the_closed_form(
    outer_momentum: float, rounds: int
) -> None:
    # Every round each worker takes H steps of -eta g from x~, so Delta = H eta g =: D in every
    # round. With m_0 = 0: m_j = D (1 - mu^j) / (1 - mu), and
    #   x~_k = x~_0 - lr sum_{j=1..k} (D + mu m_j)
    #        = x~_0 - lr D (k + mu / (1 - mu) (k - mu (1 - mu^k) / (1 - mu)))
    grad, start = f64(1.0, -2.0, 0.5), f64(3.0, 0.0, -1.0)
    eta, period, lr, mu, k = 0.05, 4, 0.7, outer_momentum, rounds
    config = AlgorithmConfig(
        name="diloco", learning_rate=eta, outer_learning_rate=lr, outer_momentum=mu
    )
    # rounds start steps 0 (p equal copies: Delta = 0), H, ..., kH: k + 1 rounds in kH + 1 steps
    sim = SimConfig(
        num_workers=2, comm_period=period, schedule="synchronous", duration=k * period + 1
    )
    result = simulate(config, sim, ConstantGradient(start, grad))
    delta = period * eta * grad
    momentum_sum = k if mu == 0 else k + mu / (1 - mu) * (k - mu * (1 - mu**k) / (1 - mu))
    want = start - lr * delta * momentum_sum
    assert torch.allclose(result.evaluated, want, rtol=0, atol=1e-12)
    for worker in result.workers:  # one more inner step from the newest center
        assert torch.allclose(worker, want - eta * grad, rtol=0, atol=1e-12)


def test_diloco_with_h1_rate1_momentum0_is_synchronous_data_parallel_sgd() -> None:
    # the independent computation: x~ <- x~ - eta (1/p) sum_j g_j(x~), the gradients drawn from
    # the simulator's per-worker generators (seed * 1_000_003 + j)
    start = torch.linspace(-2, 2, 5, dtype=torch.float64)
    objective = Quadratic(start, curvature=torch.linspace(0.5, 1.5, 5), noise_std=0.5)
    p, eta, steps, seed = 3, 0.1, 25, 2
    config = AlgorithmConfig(
        name="diloco", learning_rate=eta, outer_learning_rate=1.0, outer_momentum=0.0
    )
    sim = SimConfig(num_workers=p, comm_period=1, schedule="synchronous", duration=steps, seed=seed)
    result = simulate(config, sim, objective)
    generators = [torch.Generator().manual_seed(seed * 1_000_003 + j) for j in range(p)]
    center = start.clone()
    for _ in range(steps - 1):  # the last step's round would start step `steps`
        grads = [objective.gradient(center, g)[1] for g in generators]
        center = center - eta * sum(grads[1:], grads[0]) / p
    assert torch.allclose(result.evaluated, center, rtol=0, atol=1e-12)
    assert not torch.allclose(center, start, atol=0.1)  # it did train


def test_localsgd_is_sgd_workers_averaged_every_tau_steps_with_momentum_left_alone() -> None:
    # the independent computation: p Nesterov workers, and at the start of every step t with
    # t % tau == 0 each x_j <- (1/p) sum x_j, v_j untouched
    start = torch.linspace(-1, 1, 4, dtype=torch.float64)
    objective = Quadratic(start, curvature=torch.linspace(0.5, 2.0, 4), noise_std=1.0)
    p, tau, eta, delta, steps, seed = 3, 3, 0.1, 0.5, 17, 1
    config = AlgorithmConfig(name="localsgd", learning_rate=eta, momentum=delta)
    sim = SimConfig(
        num_workers=p, comm_period=tau, schedule="synchronous", duration=steps, seed=seed
    )
    result = simulate(config, sim, objective)
    generators = [torch.Generator().manual_seed(seed * 1_000_003 + j) for j in range(p)]
    xs, vs = [start.clone() for _ in range(p)], [torch.zeros(4, dtype=torch.float64)] * p
    center = start.clone()
    for t in range(steps):
        if t % tau == 0:
            center = sum(xs[1:], xs[0]) / p
            xs = [center.clone() for _ in range(p)]
        for j in range(p):
            grad = objective.gradient(xs[j] + delta * vs[j], generators[j])[1]
            vs[j] = delta * vs[j] - eta * grad
            xs[j] = xs[j] + vs[j]
    assert torch.allclose(result.evaluated, center, rtol=0, atol=1e-12)
    for got, want in zip(result.workers, xs, strict=True):
        assert torch.allclose(got, want, rtol=0, atol=1e-12)
    assert result.exchanges == p * 6  # t = 0, 3, ..., 15


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": "diloco", "outer_learning_rate": 0.0}, "algorithm.outer_learning_rate must be"),
        ({"name": "diloco", "outer_learning_rate": float("nan")}, "outer_learning_rate must be"),
        (
            {"name": "diloco", "outer_momentum": 1.0},
            r"algorithm.outer_momentum must be in \[0, 1\)",
        ),
        ({"name": "localsgd", "outer_momentum": 0.9}, "has no effect for 'localsgd'"),
        ({"name": "easgd", "outer_learning_rate": 0.7}, "used by diloco"),
        ({"name": "localsgd", "momentum": 1.5}, r"algorithm.momentum must be in \[0, 1\)"),
    ],
)
def test_bad_values_are_refused_naming_the_key(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AlgorithmConfig(**fields)


def test_diloco_defaults_are_the_papers() -> None:
    assert AlgorithmConfig(name="diloco").resolved_outer == (0.7, 0.9)
    assert AlgorithmConfig(
        name="diloco", outer_learning_rate=1.0, outer_momentum=0.0
    ).resolved_outer == (1.0, 0.0)


@pytest.mark.parametrize("name", ["localsgd", "diloco"])
def test_averaging_needs_the_allreduce_topology(name: str) -> None:
    with pytest.raises(ValueError, match="use topology=allreduce"):
        TrainConfig(algorithm=AlgorithmConfig(name=name))
    assert TrainConfig(algorithm=AlgorithmConfig(name=name), topology="allreduce").world_size == 4


def test_the_asynchronous_schedule_is_refused() -> None:
    objective = Quadratic(f64(1.0, 2.0))
    sim = SimConfig(num_workers=2, comm_period=2, schedule="asynchronous", duration=5)
    with pytest.raises(ValueError, match="simulate it on the synchronous schedule"):
        simulate(AlgorithmConfig(name="localsgd"), sim, objective)
