"""A sharded center (server.shards = k): k slice roles equal the unsharded server, and a real
gloo job with k = 2 shard ranks runs, resumes its checkpoints and writes the usual run directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from easgd.analysis.audit import conservation_gap
from easgd.config.algorithm import AlgorithmConfig
from easgd.config.schema import TrainConfig
from easgd.data.digits import load_digits_split
from easgd.parts.build import build_model
from easgd.recovery.checkpoint import Checkpointer
from easgd.roles import make_server_role
from easgd.roles.sharded import ShardedServer, shard_bounds
from easgd.sim import ClassifierObjective, Quadratic, SimConfig, simulate
from easgd.sim.simulator import Simulator
from tests.summary_shape import assert_summary_shape
from tests.test_train_e2e import run

FAMILIES = [
    AlgorithmConfig(name="easgd", learning_rate=0.05, moving_rate=0.2),
    AlgorithmConfig(name="eamsgd", learning_rate=0.02, momentum=0.9, moving_rate=0.2),
    AlgorithmConfig(name="downpour", learning_rate=0.05),
    AlgorithmConfig(name="adownpour", learning_rate=0.05),
    AlgorithmConfig(name="mvadownpour", learning_rate=0.05, average_rate=0.01),
    AlgorithmConfig(name="mdownpour", learning_rate=0.02, momentum=0.9),
]


def test_shard_bounds_are_contiguous_and_balanced() -> None:
    assert shard_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert shard_bounds(5, 1) == [(0, 5)]
    with pytest.raises(ValueError, match="server.shards=6 must be between 1 and"):
        shard_bounds(5, 6)


@pytest.mark.parametrize("config", FAMILIES, ids=lambda c: c.name)
def test_k_slice_roles_give_the_unsharded_run_bit_for_bit(config: AlgorithmConfig) -> None:
    start = torch.linspace(-2, 2, 11, dtype=torch.float64)
    objective = Quadratic(start, curvature=torch.linspace(0.5, 1.5, 11), noise_std=0.3)
    tau = 1 if config.name == "mdownpour" else 3
    sim = SimConfig(num_workers=3, comm_period=tau, duration=60, slowdown=[1.0, 1.6, 2.3], seed=2)
    results = {}
    for shards in (1, 2, 3):
        simulator = Simulator(config, sim, objective)
        whole = simulator.server
        assert whole is not None
        simulator.server = ShardedServer(
            whole.center,
            shards,
            lambda part: make_server_role(config, part, num_workers=3),
        )
        results[shards] = simulator.run()
    unsharded = Simulator(config, sim, objective).run()
    assert unsharded.exchanges > 20
    for shards, result in results.items():
        assert torch.equal(result.evaluated, unsharded.evaluated), shards
        for got, want in zip(result.workers, unsharded.workers, strict=True):
            assert torch.equal(got, want), shards


def test_sharded_update_norm_composes_to_the_whole_norm() -> None:
    config = FAMILIES[2]  # downpour: ||a_i||, known from the payload alone
    center = torch.linspace(-1, 1, 7, dtype=torch.float64)
    payload = torch.linspace(3, -2, 7, dtype=torch.float64)
    whole = make_server_role(config, center, num_workers=2)
    sharded = ShardedServer(center, 3, lambda part: make_server_role(config, part, num_workers=2))
    assert sharded.update_norm(payload) == pytest.approx(whole.update_norm(payload), rel=1e-14)


def _center_from_shards(run_dir: Path, shards: int) -> torch.Tensor:
    parts = []
    for shard in range(shards):
        newest = sorted((run_dir / "checkpoints").glob(f"shard{shard}-*.pt"))[-1]
        parts.append(Checkpointer.read(newest)["role"]["center"])
    return torch.cat(parts)


def _torchrun(nproc: int, *overrides: str, restarts: int = 0) -> subprocess.CompletedProcess[str]:
    return run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", f"--max-restarts={restarts}", "-m", "easgd.train",
            "progress=false", *overrides,
        ]
    )  # fmt: skip


@pytest.mark.slow
def test_gloo_job_with_two_shards_equals_the_unsharded_simulator_bit_for_bit(
    tmp_path: Path,
) -> None:
    # one worker makes the asynchronous order deterministic: the real k = 2 run (slices sent in
    # parallel to two shard processes) must give the simulator's unsharded center exactly
    steps, tau = 60, 3
    result = _torchrun(
        3, "server.shards=2", "workers=1", "algorithm=eamsgd", f"steps_per_worker={steps}",
        f"comm.period={tau}", "eval_interval_s=0.05", f"hydra.run.dir={tmp_path}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert_summary_shape(summary, topology="server")
    assert summary["details"]["shards"] == 2 and summary["exchanges"] == steps // tau
    center = _center_from_shards(tmp_path, 2)
    split = load_digits_split(test_fraction=0.2, seed=0)
    objective = ClassifierObjective(build_model(TrainConfig().model, split, seed=0), split)
    config = AlgorithmConfig(name="eamsgd", learning_rate=0.01, momentum=0.99)
    sim = simulate(config, SimConfig(num_workers=1, comm_period=tau, duration=steps), objective)
    assert torch.equal(center, sim.evaluated)
    # shard 0's final evaluation pulled shard 1's final slice: it scored exactly this center
    assert summary["test_error"] == objective.evaluate(center)["test_error"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("algorithm", "victim"),
    [("eamsgd", 1), ("downpour", 3)],
    ids=["eamsgd-shard1", "downpour-worker"],
)
def test_a_killed_rank_resumes_every_rank_from_a_consistent_sharded_snapshot(
    tmp_path: Path, algorithm: str, victim: int
) -> None:
    # ranks 0-1 are the shards, 2-3 the workers; a kill -9 of a shard or a worker (once a
    # snapshot is committed: an event, not a step count, so a slow machine cannot kill first)
    # restarts the job, which resumes every rank from the newest committed snapshot
    steps = 400
    result = _torchrun(
        4, "server.shards=2", "workers=2", f"algorithm={algorithm}", f"steps_per_worker={steps}",
        "comm.period=2", "eval_interval_s=0.05", "checkpoint.every_s=0.01", "checkpoint.ledger=true",
        f"fault.kill_rank={victim}", "fault.kill_at_step=60", "fault.kill_after_commit=true",
        f"hydra.run.dir={tmp_path}",
        restarts=1,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    who = "shard 1" if victim == 1 else f"worker {victim}"
    assert f"{who} sends itself SIGKILL" in result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["restarts"] == 1 and summary["worker_steps"] == 2 * steps
    # the workers resumed from their parts of the snapshot, not from the center
    assert all(0 < s < steps for s in summary["resumed_worker_steps"].values())
    # the center (both slices) is the initial center plus every exchange's change, each once
    assert conservation_gap(tmp_path) < 1e-5
    split = load_digits_split(test_fraction=0.2, seed=0)
    objective = ClassifierObjective(build_model(TrainConfig().model, split, seed=0), split)
    center = _center_from_shards(tmp_path, 2)
    assert summary["test_error"] == objective.evaluate(center)["test_error"] < 0.15


def test_shard_keys_are_checked_before_any_process_starts() -> None:
    from easgd.config.schema import ServerConfig

    assert TrainConfig(workers=3, server=ServerConfig(shards=2)).world_size == 5
    with pytest.raises(ValueError, match="server.shards must be an integer >= 1"):
        ServerConfig(shards=0)
    with pytest.raises(ValueError, match="max_update_norm bounds the norm of a whole update"):
        TrainConfig(server=ServerConfig(shards=2), max_update_norm=3.0)
    with pytest.raises(ValueError, match="server.shards applies to topology=server"):
        TrainConfig(topology="allreduce", server=ServerConfig(shards=2))
