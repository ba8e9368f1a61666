"""Local SGD and DiLoCo over all-reduce (topology=allreduce): the replicated-center loop against the
simulator's synchronous schedule, bit for bit, as ranks in threads, on a real model, and as a
real torchrun job (the pattern of tests/test_allreduce.py for EASGD)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from easgd.config.algorithm import AlgorithmConfig
from easgd.config.schema import TrainConfig
from easgd.engine.allreduce import rank_round
from easgd.roles import GradientFn, WorkerRole
from easgd.roles.averaging import AveragingWorker
from easgd.sim import Quadratic, SimConfig, simulate
from tests.summary_shape import assert_summary_shape
from tests.test_allreduce import run_loops

CASES = [
    AlgorithmConfig(name="localsgd", learning_rate=0.05),
    AlgorithmConfig(name="localsgd", learning_rate=0.05, momentum=0.9),
    AlgorithmConfig(name="diloco", learning_rate=0.05),
    AlgorithmConfig(name="diloco", learning_rate=0.05, momentum=0.5, outer_momentum=0.3),
]


@pytest.mark.parametrize("config", CASES, ids=lambda c: f"{c.name}-{c.momentum}")
def test_threads_match_the_simulators_synchronous_schedule_bit_for_bit(
    config: AlgorithmConfig,
) -> None:
    start = torch.linspace(-2, 2, 5, dtype=torch.float64)
    objective = Quadratic(start, curvature=torch.linspace(0.5, 1.5, 5), noise_std=0.5)
    p, tau, steps = 3, 2, 41
    sim = SimConfig(num_workers=p, comm_period=tau, schedule="synchronous", duration=steps, seed=4)
    result = simulate(config, sim, objective)
    ranks: list[tuple[WorkerRole, GradientFn]] = []
    for rank in range(p):
        generator = torch.Generator().manual_seed(4 * 1_000_003 + rank)  # the simulator's
        role = AveragingWorker(start, comm_period=tau, learning_rate=0.05, momentum=config.momentum)
        ranks.append((role, lambda point, g=generator: objective.gradient(point, g)))
    loops = run_loops(
        ranks,
        start,
        moving_rate=0.0,
        steps=steps,
        options=lambda rank: {
            "rule": rank_round(config, start, num_workers=p, measure=True),
            "measure_distance": True,
        },
    )
    assert loops[0].rounds == 21  # t = 0, 2, ..., 40
    assert not torch.equal(loops[0].center, start)
    for loop, want in zip(loops, result.workers, strict=True):
        assert torch.equal(loop.center, result.evaluated)
        assert torch.equal(loop.role.params, want)
    outcome = loops[0].run()  # the budget is spent: returns the figures at once
    assert outcome.mean_drift is not None and outcome.mean_center_update_norm is not None
    assert outcome.mean_drift > 0 and outcome.mean_center_update_norm > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["localsgd", "diloco"])
def test_torchrun_job_equals_the_simulator_and_records_drift(name: str, tmp_path: Path) -> None:
    from easgd.data.digits import load_digits_split
    from easgd.parts.build import build_model
    from easgd.recovery.checkpoint import Checkpointer
    from easgd.recovery.snapshot import SnapshotLog
    from easgd.sim import ClassifierObjective
    from tests.test_train_e2e import run

    steps, tau = 40, 4
    args = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "easgd.train", "topology=allreduce", "workers=2", f"algorithm={name}",
        f"steps_per_worker={steps}", f"comm.period={tau}", "eval_interval_s=0.05",
        "progress=false", f"hydra.run.dir={tmp_path}",
    ]  # fmt: skip
    result = run(args)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert_summary_shape(summary, topology="allreduce")
    assert summary["algorithm"] == name and summary["exchanges"] == 2 * (steps // tau)
    details = summary["details"]
    assert details["worker_drift"] > 0 and details["center_update_norm"] > 0
    # the final snapshot (saved by every rank after the loop) against the synchronous schedule
    directory = tmp_path / "checkpoints"
    final = Checkpointer(directory, "rank1").load(SnapshotLog(directory).committed()[-1])
    assert final is not None and final["role"]["step"] == steps
    split = load_digits_split(test_fraction=0.2, seed=0)
    objective = ClassifierObjective(build_model(TrainConfig().model, split, seed=0), split)
    config = AlgorithmConfig(name=name, learning_rate=0.1)  # configs/algorithm/<name>.yaml
    sim = simulate(
        config,
        SimConfig(num_workers=2, comm_period=tau, schedule="synchronous", duration=steps),
        objective,
    )
    assert torch.equal(final["center"], sim.evaluated)
    assert torch.equal(final["role"]["params"], sim.workers[1])
    if name == "diloco":  # the outer momentum travels with the snapshot
        assert set(final["round"]) == {"outer_momentum"}
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"worker1/drift", "worker2/drift", "center/update_norm"} <= tags


# -- the simulator's clock for all-reduce rounds -----------------------------------------------
def test_a_round_costs_a_ring_allreduce_of_the_model() -> None:
    from easgd.sim.cost import ExchangeCost, ring_allreduce_time

    # p = 4: 2 (p - 1) = 6 messages of 1/4 of the model: 6 * 0.1 + 6 / 4 * 2.0 + 0.05
    cost = ExchangeCost(latency=0.1, transfer=2.0, service=0.05)
    assert ring_allreduce_time(cost, 4) == pytest.approx(0.6 + 3.0 + 0.05, abs=1e-12)
    assert ring_allreduce_time(cost, 1) == pytest.approx(0.05, abs=1e-12)  # nobody to talk to


@pytest.mark.parametrize("name", ["localsgd", "diloco", "easgd"])
def test_synchronous_schedule_with_cost_waits_for_every_round(name: str) -> None:
    from easgd.sim.cost import ExchangeCost

    start = torch.linspace(-2, 2, 5, dtype=torch.float64)
    objective = Quadratic(start, noise_std=0.5)
    config = AlgorithmConfig(name=name, learning_rate=0.05)
    p, tau, steps = 4, 5, 23
    cost = ExchangeCost(latency=0.25, transfer=1.0)  # a round: 6 * 0.25 + 1.5 * 1.0 = 3 steps
    free = SimConfig(num_workers=p, comm_period=tau, schedule="synchronous", duration=steps)
    charged = SimConfig(
        num_workers=p,
        comm_period=tau,
        schedule="synchronous",
        duration=float("inf"),
        steps_per_worker=steps,
        cost=cost,
        eval_interval=1.0,
    )
    without, with_cost = simulate(config, free, objective), simulate(config, charged, objective)
    # the same math (rounds at t = 0, 5, ..., 20), on a slower clock: 23 steps + 5 rounds * 3
    assert torch.equal(without.evaluated, with_cost.evaluated)
    assert with_cost.history[-1].time == pytest.approx(23 + 5 * 3.0)
    assert with_cost.exchanges == p * 5


def test_mode_simulate_runs_the_allreduce_topology_on_the_ring_clock(tmp_path: Path) -> None:
    from easgd.config.schema import CommConfig, CostConfig
    from easgd.topologies.simulate import run_simulated
    from tests.test_simulate_mode import small_config

    # step 1 ms; 4 ranks; latency 50 us, no bandwidth limit: a round is 6 * 50 us = 0.3 ms
    summary = run_simulated(
        small_config(
            tmp_path,
            algorithm=AlgorithmConfig("diloco", learning_rate=0.1),
            comm=CommConfig(period=4),
            cost=CostConfig(name="test", latency_us=50.0, step_time_s=1e-3),
            topology="allreduce",
            workers=4,
            steps_per_worker=20,
        )
    )
    assert_summary_shape(summary, topology="allreduce", mode="simulate")
    assert summary["exchanges"] == 4 * 5 and summary["server_updates"] == 5  # t = 0, 4, ..., 16
    assert summary["wall_time_s"] == pytest.approx(20e-3 + 5 * 0.3e-3)


# -- torch's own local SGD ------------------------------------------------------------------------
@pytest.mark.slow
def test_localsgd_equals_torchs_periodic_model_averager_on_two_gloo_ranks() -> None:
    from tests import averaging_targets
    from tests.dist_helpers import spawn_world

    steps, period = 3 * 4 + 2, 4  # not a multiple: the last average is inside both runs
    results = spawn_world(
        averaging_targets.localsgd_against_periodic_model_averager, 2, steps, period, 0.1
    )
    assert results[0]["rounds"] == 4  # t = 0, 4, 8, 12
    # within 1e-6, not bit for bit: torch's SGD step fuses -lr * g into the add (one rounding),
    # easgd rounds the product first (measured difference: 3e-8)
    for rank in (0, 1):
        got, want = results[rank]["easgd"], results[rank]["torch"]
        assert torch.allclose(got, want, rtol=0, atol=1e-6), float((got - want).abs().max())
    # the two ranks took different minibatches since the last average at t = 12
    assert not torch.allclose(results[0]["torch"], results[1]["torch"], atol=1e-4)


# -- the own-loop API --------------------------------------------------------------------------
@pytest.mark.slow
def test_api_diloco_around_adamw_equals_diloco_written_with_torchs_optimizers() -> None:
    from tests import averaging_targets
    from tests.dist_helpers import spawn_world

    steps, period = 13, 4  # rounds after steps 4, 8, 12; one inner step after the last
    results = spawn_world(averaging_targets.api_diloco_with_adamw_against_torch, 2, steps, period)
    for rank in (0, 1):
        result = results[rank]
        assert result["rounds"] == 3
        assert torch.allclose(result["easgd_center"], result["torch_center"], rtol=0, atol=1e-6)
        assert torch.allclose(result["easgd"], result["torch"], rtol=0, atol=1e-6)
    assert torch.equal(results[0]["easgd_center"], results[1]["easgd_center"])
    assert not torch.allclose(results[0]["easgd"], results[1]["easgd"], atol=1e-4)


@pytest.mark.slow
def test_api_localsgd_around_nesterov_sgd_equals_periodic_model_averager() -> None:
    from tests import averaging_targets
    from tests.dist_helpers import spawn_world

    target = averaging_targets.api_localsgd_with_momentum_against_periodic_model_averager
    results = spawn_world(target, 2, 10, 3)
    for rank in (0, 1):
        assert torch.allclose(results[rank]["easgd"], results[rank]["torch"], rtol=0, atol=1e-6)


def test_api_refuses_a_rule_that_is_not_averaging() -> None:
    from easgd.api.averaging import AveragingOptimizer

    model = torch.nn.Linear(2, 1)
    with pytest.raises(ValueError, match="runs localsgd or diloco"):
        AveragingOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), algorithm="easgd")


def test_a_resumed_rank_restores_dilocos_outer_momentum() -> None:
    # what a snapshot's "round" entry holds is copied into the new rule; a fresh rule starts at 0
    from easgd.topologies.allreduce import _Start

    cfg = TrainConfig(algorithm=AlgorithmConfig("diloco"), topology="allreduce", workers=2)
    saved = torch.arange(5, dtype=torch.float32)
    rule = _Start(torch.ones(5), round_state={"outer_momentum": saved}).round_rule(cfg)
    assert torch.equal(rule.tensors()["outer_momentum"], saved)
    assert torch.equal(rule.center, torch.ones(5))
    fresh = _Start(torch.ones(5)).round_rule(cfg)
    assert torch.equal(fresh.tensors()["outer_momentum"], torch.zeros(5))
