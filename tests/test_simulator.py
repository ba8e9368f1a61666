"""The simulator: schedules, delay, determinism, and conservation under asynchrony."""

from __future__ import annotations

import pytest
import torch

from easgd import algorithms as alg
from easgd.config.algorithm import AlgorithmConfig
from easgd.data import load_digits_split
from easgd.models import MLP
from easgd.sim import ClassifierObjective, Quadratic, SimConfig, simulate
from easgd.sim.simulator import SimResult


def noisy_quadratic(dim: int = 6, noise: float = 0.5) -> Quadratic:
    start = torch.linspace(-2, 2, dim, dtype=torch.float64)
    return Quadratic(
        start, curvature=torch.linspace(0.5, 1.5, dim, dtype=torch.float64), noise_std=noise
    )


def test_zero_learning_rate_async_run_conserves_center_plus_workers() -> None:
    objective = noisy_quadratic()
    config = AlgorithmConfig(name="eamsgd", learning_rate=0.0, momentum=0.9, moving_rate=0.2)
    sim = SimConfig(num_workers=4, comm_period=3, duration=300, slowdown=[1.0, 1.7, 0.6, 3.1])
    # the workers start apart, so every exchange moves something
    result = simulate(config, sim, objective)
    p = 4
    assert result.exchanges > 100
    total = result.evaluated + sum(result.workers)
    assert torch.allclose(total, (p + 1) * objective.initial_point(), rtol=0, atol=1e-12)


def test_synchronous_schedule_is_synchronous_easgd() -> None:
    objective = Quadratic(
        torch.tensor([1.0, -3.0], dtype=torch.float64),
        curvature=torch.tensor([1.0, 0.3], dtype=torch.float64),
    )
    config = AlgorithmConfig(name="easgd", learning_rate=0.1, moving_rate=0.2)
    result = simulate(
        config,
        SimConfig(num_workers=3, comm_period=1, schedule="synchronous", duration=25),
        objective,
    )
    # the same 25 steps through the pure synchronous rule (all workers start at the same point)
    workers = [objective.initial_point() for _ in range(3)]
    center = objective.initial_point()
    for _ in range(25):
        grads = [objective.curvature * x for x in workers]
        workers, center = alg.synchronous_easgd_step(
            workers, center, grads, learning_rate=0.1, moving_rate=0.2
        )
    assert torch.allclose(result.evaluated, center, atol=1e-13)
    for got, want in zip(result.workers, workers, strict=True):
        assert torch.allclose(got, want, atol=1e-13)


def test_same_seed_is_bit_identical_and_the_seed_never_changes_the_schedule() -> None:
    split = load_digits_split(seed=0)

    def run(seed: int) -> SimResult:
        torch.manual_seed(0)
        objective = ClassifierObjective(MLP(split.input_shape, 10, (32,)), split, batch_size=32)
        config = AlgorithmConfig(name="eamsgd", learning_rate=0.05, momentum=0.9)
        sim = SimConfig(
            num_workers=3, comm_period=4, duration=40, slowdown=[1.0, 1.3, 2.0], seed=seed
        )
        return simulate(config, sim, objective)

    first, again, other = run(1), run(1), run(2)
    assert torch.equal(first.evaluated, again.evaluated)
    assert [torch.equal(a, b) for a, b in zip(first.workers, again.workers, strict=True)] == [
        True
    ] * 3
    # the seed draws minibatches only: the event schedule (set by the slowdowns) is the same
    assert (other.exchanges, other.steps) == (first.exchanges, first.steps)
    assert [h.exchanges for h in other.history] == [h.exchanges for h in first.history]


def test_read_staleness_uses_an_old_center() -> None:
    objective = noisy_quadratic(noise=0.0)
    config = AlgorithmConfig(name="easgd", learning_rate=0.05, moving_rate=0.2)
    fresh = simulate(config, SimConfig(num_workers=2, comm_period=1, duration=20), objective)
    stale = simulate(
        config, SimConfig(num_workers=2, comm_period=1, duration=20, read_staleness=3), objective
    )
    assert not torch.allclose(fresh.evaluated, stale.evaluated)


def test_stale_center_easgd_converges_where_downpour_diverges() -> None:
    # The paper's claim on delay, on a noiseless quadratic: the center read 4 server updates late.
    objective = noisy_quadratic(noise=0.0)
    sim = SimConfig(num_workers=4, comm_period=2, duration=400, read_staleness=4)
    easgd = simulate(
        AlgorithmConfig(name="easgd", learning_rate=0.1, moving_rate=0.2), sim, objective
    )
    downpour = simulate(AlgorithmConfig(name="downpour", learning_rate=0.1), sim, objective)
    start = easgd.history[0].test_error
    assert easgd.final.test_error < 1e-3 * start
    assert downpour.final.test_error > 10 * start
    # without the delay both converge
    fresh = simulate(
        AlgorithmConfig(name="downpour", learning_rate=0.1),
        SimConfig(num_workers=4, comm_period=2, duration=400),
        objective,
    )
    assert fresh.final.test_error < 1e-3 * start


def test_push_delay_keeps_conservation_once_everything_arrived() -> None:
    objective = noisy_quadratic()
    config = AlgorithmConfig(name="easgd", learning_rate=0.0, moving_rate=0.3)
    sim = SimConfig(num_workers=3, comm_period=1, duration=50, push_delay=4.5, read_staleness=2)
    result = simulate(config, sim, objective)
    assert torch.allclose(
        result.evaluated + sum(result.workers), 4 * objective.initial_point(), atol=1e-12
    )


def test_straggler_takes_fewer_steps() -> None:
    objective = noisy_quadratic()
    config = AlgorithmConfig(name="easgd", learning_rate=0.01, moving_rate=0.1)
    result = simulate(
        config, SimConfig(num_workers=2, comm_period=1, duration=30, slowdown=[1.0, 3.0]), objective
    )
    assert result.steps == 30 + 10


def test_bad_sim_config_is_rejected() -> None:
    with pytest.raises(ValueError, match="sim.schedule"):
        SimConfig(schedule="gossip")
    with pytest.raises(ValueError, match="sim.slowdown"):
        SimConfig(num_workers=2, slowdown=[1.0])


def test_flat_model_gradient_matches_plain_autograd() -> None:
    from torch.nn.utils import vector_to_parameters

    from easgd.flat import FlatModel

    torch.manual_seed(0)
    model, reference = MLP((12,), 3, (8,)), MLP((12,), 3, (8,))
    reference.load_state_dict(model.state_dict())
    flat = FlatModel(model, weight_decay=0.1)
    inputs, targets = torch.randn(5, 12), torch.tensor([0, 1, 2, 1, 0])
    point = flat.initial_point() + 0.05
    for _ in range(2):  # the second call must not accumulate onto the first
        loss, grad = flat.loss_and_grad(point, inputs, targets)
    with torch.no_grad():
        vector_to_parameters(point, reference.parameters())
    expected_loss = torch.nn.functional.cross_entropy(reference(inputs), targets)
    expected_loss.backward()
    expected = torch.cat([p.grad.reshape(-1) for p in reference.parameters()]) + 0.1 * point
    assert loss == pytest.approx(float(expected_loss.detach()))
    assert torch.allclose(grad, expected, atol=1e-6)


def test_demo_prints_the_comparison_table(capsys: pytest.CaptureFixture[str], tmp_path) -> None:  # type: ignore[no-untyped-def]
    from easgd.sim.demo import main

    main(["--duration", "60", "--eval-interval", "30", "--csv", str(tmp_path / "curves.csv")])
    out = capsys.readouterr().out
    for label in ("EAMSGD tau=10", "EASGD tau=10", "DOWNPOUR tau=1", "MSGD p=1"):
        assert f"| {label} |" in out
    assert "| t=0 | t=30 | t=60 |" in out
    assert len((tmp_path / "curves.csv").read_text().splitlines()) == 1 + 4 * 3
