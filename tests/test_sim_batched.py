"""The simulator's batched path (easgd/sim/batched.py) against its one-call-per-step path.

Two levels of equality, each said in the test:
- on a noisy quadratic the batched gradients are the same elementwise operations, so every run
  (every algorithm the simulator serves, every schedule, stragglers, delays, costs, compression,
  schedules and clipping) must be equal **bit for bit**: centre, workers, history, counters;
- on a network (an MLP and a 1-D CNN in float64) ``vmap`` may sum in another order than the single
  call, so runs must agree **within 1e-6** (float64), and a flipped minibatch stream must not.
Every batched run also checks that it really batched (mean batch well above 1).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from easgd.algorithms.schedules import LearningRateSchedule
from easgd.config.algorithm import AlgorithmConfig
from easgd.data.split import Split
from easgd.models import MLP
from easgd.models.cnn1d import ConvNet1D
from easgd.sim import ClassifierObjective, Quadratic, SimConfig, Simulator
from easgd.sim.batched import DeferredSteps, check_batched
from easgd.sim.cost import ExchangeCost
from easgd.sim.objectives import Objective


def noisy_quadratic(dim: int = 8) -> Quadratic:
    start = torch.linspace(-2, 2, dim, dtype=torch.float64)
    curvature = torch.linspace(0.5, 1.5, dim, dtype=torch.float64)
    return Quadratic(start, curvature=curvature, noise_std=0.3)


ALGORITHMS = {
    "easgd": AlgorithmConfig("easgd", learning_rate=0.1),
    "eamsgd": AlgorithmConfig("eamsgd", learning_rate=0.05, momentum=0.9),
    "downpour": AlgorithmConfig("downpour", learning_rate=0.05),
    "adownpour": AlgorithmConfig("adownpour", learning_rate=0.05),
    "mvadownpour": AlgorithmConfig("mvadownpour", learning_rate=0.05, average_rate=0.01),
    "mdownpour": AlgorithmConfig("mdownpour", learning_rate=0.02, momentum=0.5),
    "localsgd": AlgorithmConfig("localsgd", learning_rate=0.05, momentum=0.5),
    "diloco": AlgorithmConfig("diloco", learning_rate=0.05),
}
STRAGGLERS = [1.0, 1.6, 0.7, 2.3]
COST = ExchangeCost(latency=0.3, transfer=0.45, service=0.2)
# schedule name -> SimConfig keywords (4 workers); each paired below with the rules it serves
SCHEDULES: dict[str, dict[str, Any]] = {
    "asynchronous": {},
    "stragglers": {"slowdown": STRAGGLERS},
    "round_robin": {"schedule": "round_robin"},
    "synchronous": {"schedule": "synchronous"},
    "synchronous_cost": {"schedule": "synchronous", "cost": COST},
    "cost": {"cost": COST, "slowdown": STRAGGLERS},
    "cost_overlap": {"cost": COST, "overlap": True, "slowdown": STRAGGLERS},
    "delay": {"read_staleness": 2, "push_delay": 1.5, "slowdown": STRAGGLERS},
    "compression": {"compression": "int8", "slowdown": STRAGGLERS},
    "schedule_clip_budget": {
        "slowdown": STRAGGLERS,
        "lr_schedule": LearningRateSchedule(
            "cosine", warmup_steps=5, options={"decay_steps": 40, "final_ratio": 0.1}
        ),
        "max_grad_norm": 0.5,
        "steps_per_worker": 30,
        "duration": float("inf"),
        "eval_interval": float("inf"),
        "eval_interval_steps": 7,
    },
}
ASYNC = ("easgd", "eamsgd", "downpour", "adownpour", "mvadownpour")
SERVED = {
    "asynchronous": (*ASYNC, "mdownpour"),
    "stragglers": (*ASYNC, "mdownpour"),
    "round_robin": (*ASYNC, "mdownpour"),
    "synchronous": ("easgd", "eamsgd", "localsgd", "diloco", "downpour"),
    "synchronous_cost": ("eamsgd", "localsgd", "diloco"),
    "cost": (*ASYNC, "mdownpour"),
    "cost_overlap": ("easgd", "eamsgd"),
    "delay": ("easgd", "eamsgd", "downpour"),
    "compression": ("eamsgd", "downpour"),
    "schedule_clip_budget": ("eamsgd", "downpour"),
}
CASES = [(schedule, name) for schedule, names in SERVED.items() for name in names]


def run(
    algorithm: AlgorithmConfig, objective: Objective, batched: str, **keywords: Any
) -> tuple[Any, Simulator]:
    period = 1 if algorithm.name == "mdownpour" else 3
    config = {"num_workers": 4, "comm_period": period, "duration": 60.0, "eval_interval": 9.0}
    config.update(keywords)
    if algorithm.name == "mdownpour" and "lr_schedule" in config:
        config.pop("lr_schedule")
    simulator = Simulator(algorithm, SimConfig(**config, batched=batched), objective)
    losses: list[tuple[int, float]] = []
    simulator.on_gradient.append(lambda worker, loss: losses.append((worker, loss)))
    result = simulator.run()
    # what the observers saw: each worker's minibatch losses in its step order
    result.losses = [[loss for w, loss in losses if w == worker] for worker in range(4)]  # type: ignore[attr-defined]
    return result, simulator


def assert_really_batched(simulator: Simulator, steps: int) -> None:
    assert simulator.batch is not None
    assert simulator.batch.calls > 0 and steps / simulator.batch.calls >= 2.0, (
        steps,
        simulator.batch.calls,
    )


@pytest.mark.parametrize(("schedule", "name"), CASES, ids=[f"{s}-{n}" for s, n in CASES])
def test_quadratic_batched_equals_per_worker_bit_for_bit(schedule: str, name: str) -> None:
    """Bit for bit: the quadratic's batched gradient is the same elementwise arithmetic."""
    algorithm = ALGORITHMS[name]
    one, _ = run(algorithm, noisy_quadratic(), "false", **SCHEDULES[schedule])
    many, simulator = run(algorithm, noisy_quadratic(), "true", **SCHEDULES[schedule])
    assert_really_batched(simulator, many.steps)
    assert torch.equal(many.evaluated, one.evaluated)
    for got, want in zip(many.workers, one.workers, strict=True):
        assert torch.equal(got, want)
    assert (many.steps, many.exchanges, many.stop_reason) == (
        one.steps,
        one.exchanges,
        one.stop_reason,
    )
    assert [dataclasses.astuple(p) for p in many.history] == [
        dataclasses.astuple(p) for p in one.history
    ]
    assert many.losses == one.losses  # type: ignore[attr-defined]
    assert one.steps > 40 and one.exchanges > 4  # the run did something


def test_auto_batches_a_served_objective_and_not_one_worker() -> None:
    algorithm = ALGORITHMS["eamsgd"]
    assert Simulator(algorithm, SimConfig(num_workers=4), noisy_quadratic()).batch is not None
    assert Simulator(algorithm, SimConfig(num_workers=1), noisy_quadratic()).batch is None
    assert (
        Simulator(algorithm, SimConfig(num_workers=4, batched="false"), noisy_quadratic()).batch
        is None
    )
    # a convolution on a CPU: correct batched, but slower, so auto leaves it; true takes it
    assert Simulator(algorithm, SimConfig(num_workers=4), network("cnn1d")).batch is None
    assert Simulator(algorithm, SimConfig(num_workers=4), network("mlp")).batch is not None
    cnn = Simulator(algorithm, SimConfig(num_workers=4, batched="true"), network("cnn1d"))
    assert cnn.batch is not None


def test_bad_values_and_unserved_runs_are_refused_with_the_key() -> None:
    assert check_batched(True) == "true" and check_batched("AUTO") == "auto"
    with pytest.raises(ValueError, match="sim.batched='sometimes'; allowed: auto, true, false"):
        SimConfig(batched="sometimes")

    class Plain:  # an objective without gradients()
        def __init__(self) -> None:
            self.inner = noisy_quadratic()

        def initial_point(self) -> torch.Tensor:
            return self.inner.initial_point()

        def gradient(self, point: torch.Tensor, generator: torch.Generator) -> Any:
            return self.inner.gradient(point, generator)

        def evaluate(self, point: torch.Tensor) -> dict[str, float]:
            return self.inner.evaluate(point)

    algorithm = ALGORITHMS["easgd"]
    assert Simulator(algorithm, SimConfig(), Plain()).batch is None  # auto: falls back
    with pytest.raises(ValueError, match="sim.batched=true.*Plain has no batched gradients"):
        Simulator(algorithm, SimConfig(batched="true"), Plain())
    split = tiny_split()
    norm = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.BatchNorm1d(6), nn.Linear(6, 3))
    with pytest.raises(ValueError, match="buffers"):
        Simulator(algorithm, SimConfig(batched="true"), ClassifierObjective(norm, split))
    dropout = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.Dropout(0.1), nn.Linear(6, 3))
    assert Simulator(algorithm, SimConfig(), ClassifierObjective(dropout, split)).batch is None


def test_deferring_a_worker_twice_is_an_error() -> None:
    steps = DeferredSteps([], noisy_quadratic(), [], [])  # type: ignore[arg-type]
    steps._is_pending = [False]
    steps.defer(0)
    with pytest.raises(RuntimeError, match="already has a gradient step pending"):
        steps.defer(0)


# -- networks: within 1e-6 in float64 -------------------------------------------------------


def tiny_split(length: int = 12, num_train: int = 96) -> Split:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(num_train + 48, length, generator=generator, dtype=torch.float64)
    y = (x[:, :4].sum(1) > 0).long() + (x[:, 4:8].sum(1) > 1).long()
    return Split("tiny", x[:num_train], y[:num_train], x[num_train:], y[num_train:], 3)


def network(kind: str) -> ClassifierObjective:
    torch.manual_seed(0)
    module: nn.Module = (
        MLP((12,), 3, (16, 16)) if kind == "mlp" else ConvNet1D((12,), 3, channels=4)
    )
    return ClassifierObjective(module.double(), tiny_split(), batch_size=16, weight_decay=1e-3)


NETWORK_CASES = [
    ("mlp", "eamsgd", "cost"),
    ("mlp", "downpour", "stragglers"),
    ("cnn1d", "eamsgd", "stragglers"),
    ("cnn1d", "diloco", "synchronous"),
    ("cnn1d", "mdownpour", "cost"),
    ("cnn1d", "easgd", "schedule_clip_budget"),
]


@pytest.mark.parametrize(("kind", "name", "schedule"), NETWORK_CASES)
def test_network_batched_equals_per_worker_within_1e_6(kind: str, name: str, schedule: str) -> None:
    """Within 1e-6 (float64): vmap's batched kernels may sum in another order (max seen ~1e-15)."""
    algorithm = ALGORITHMS[name]
    keywords = {"duration": 40.0, **SCHEDULES[schedule]}
    one, _ = run(algorithm, network(kind), "false", **keywords)
    many, simulator = run(algorithm, network(kind), "true", **keywords)
    assert_really_batched(simulator, many.steps)
    torch.testing.assert_close(many.evaluated, one.evaluated, rtol=0, atol=1e-6)
    for got, want in zip(many.workers, one.workers, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert (many.steps, many.exchanges) == (one.steps, one.exchanges)
    for a, b in zip(many.history, one.history, strict=True):
        assert (a.time, a.steps, a.exchanges) == (b.time, b.steps, b.exchanges)
        assert a.test_loss == pytest.approx(b.test_loss, abs=1e-6)
    for got, want in zip(many.losses, one.losses, strict=True):  # type: ignore[attr-defined]
        assert got == pytest.approx(want, abs=1e-6)
    moved = max(float((w - network(kind).initial_point()).abs().max()) for w in one.workers)
    assert moved > 1e-3  # the comparison is not between two points that never left the start


def test_a_swapped_minibatch_stream_is_seen() -> None:
    """The network comparison can fail: batched gradients drawn from the wrong workers' streams
    (a plausible bug: generators out of order) move the workers by far more than 1e-6."""
    algorithm = ALGORITHMS["eamsgd"]
    one, _ = run(algorithm, network("mlp"), "false", duration=20.0, slowdown=STRAGGLERS)
    objective = network("mlp")
    original = objective.gradients
    objective.gradients = lambda points, generators: original(  # type: ignore[method-assign]
        points, list(reversed(generators))
    )
    many, _ = run(algorithm, objective, "true", duration=20.0, slowdown=STRAGGLERS)
    difference = max(
        float((a - b).abs().max()) for a, b in zip(many.workers, one.workers, strict=True)
    )
    assert difference > 1e-4


def test_stacked_gradients_equal_single_calls() -> None:
    """Row j of FlatModel.stacked_loss_and_grad is loss_and_grad of point j (within 1e-12, float64);
    an MLP's batched matmul sums in the same order on CPU: bit for bit in this case."""
    objective = network("cnn1d")
    points = objective.initial_point() + 0.1 * torch.randn(
        5,
        objective.flat.num_params,
        dtype=torch.float64,
        generator=torch.Generator().manual_seed(1),
    )
    generators = [torch.Generator().manual_seed(i) for i in range(5)]
    losses, grads = objective.gradients(points, generators)
    generators = [torch.Generator().manual_seed(i) for i in range(5)]
    for j in range(5):
        loss, grad = objective.gradient(points[j], generators[j])
        assert float(losses[j]) == pytest.approx(loss, abs=1e-12)
        torch.testing.assert_close(grads[j], grad, rtol=0, atol=1e-12)


# -- the config key --------------------------------------------------------------------------


def test_sim_batched_composes_from_the_command_line_and_reaches_the_simulator(
    tmp_path: Path,
) -> None:
    from easgd.config.schema import SimulateConfig
    from easgd.topologies.simulate import build_simulation
    from tests.test_configs import composed
    from tests.test_simulate_mode import small_config

    assert composed("mode=simulate").sim.batched == "auto"
    assert composed("mode=simulate", "sim.batched=false").sim.batched == "false"
    assert composed("mode=simulate", "sim.batched=true").sim.batched == "true"
    with pytest.raises(Exception, match="sim.batched='often'; allowed: auto, true, false"):
        composed("mode=simulate", "sim.batched=often")
    for choice, batched in (("auto", True), ("true", True), ("false", False)):
        cfg = small_config(tmp_path, workers=3, sim=SimulateConfig(batched=choice))
        simulator, _ = build_simulation(cfg)
        assert (simulator.batch is not None) is batched


def test_probes_read_the_same_workers_on_the_batched_path() -> None:
    """Within 1e-6 (float64): the probes' worker spread at every evaluation (they read the
    workers inside the evaluation, after the pending steps landed) and the travel per exchange."""
    from easgd.analysis.probes import ExchangeProbe, ProbedObjective

    records, travels = {}, {}
    for batched in ("false", "true"):
        probed = ProbedObjective(network("mlp"))
        simulator = Simulator(
            ALGORITHMS["eamsgd"],
            SimConfig(num_workers=4, comm_period=3, duration=30.0, eval_interval=4.0,
                      slowdown=STRAGGLERS, batched=batched),
            probed,
        )  # fmt: skip
        probed.attach(simulator)
        travel = ExchangeProbe(simulator.workers)
        simulator.run()
        assert (simulator.batch is not None) is (batched == "true")
        records[batched], travels[batched] = probed.records, travel.travel
    assert len(records["true"]) == len(records["false"]) > 5
    for a, b in zip(records["true"], records["false"], strict=True):
        assert (a.time, a.steps) == (b.time, b.steps)
        assert a.worker_distance == pytest.approx(b.worker_distance, abs=1e-6)
    flat = [v for per in travels["true"] for v in per]
    assert flat == pytest.approx([v for per in travels["false"] for v in per], abs=1e-6)
    assert len(flat) > 10
