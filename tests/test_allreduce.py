"""Synchronous EASGD with a replicated center (topology=allreduce): the equations, the simulator,
and a real torchrun job that is killed, restarted and resumed."""

from __future__ import annotations

import csv
import json
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from easgd import algorithms as alg
from easgd.config.algorithm import AlgorithmConfig
from easgd.config.schema import TrainConfig
from easgd.engine.allreduce import ReduceFn, ReplicatedCenterLoop
from easgd.roles import ElasticWorker, GradientFn
from easgd.sim import Quadratic, SimConfig, simulate
from tests.conftest import f64
from tests.summary_shape import assert_summary_shape


class ThreadSum:
    """p ranks as threads; each rank's reduce returns v_0 + v_1 + ... + v_{p-1} in rank order."""

    def __init__(self, ranks: int) -> None:
        self.barrier = threading.Barrier(ranks)
        self.sent: list[tuple[Tensor, Tensor]] = [(torch.zeros(0), torch.zeros(0))] * ranks

    def for_rank(self, rank: int) -> ReduceFn:
        def reduce(values: Tensor, control: Tensor) -> tuple[Tensor, Tensor]:
            self.sent[rank] = (values.clone(), control.clone())
            self.barrier.wait()
            first_v, first_c = self.sent[0]
            total_v = sum((v for v, _ in self.sent[1:]), first_v)
            total_c = sum((c for _, c in self.sent[1:]), first_c)
            self.barrier.wait()  # nobody overwrites its entry before every rank has summed
            return total_v, total_c

        return reduce


def run_threads(
    starts: list[Tensor],
    center: Tensor,
    objective: Quadratic,
    *,
    learning_rate: float,
    momentum: float,
    moving_rate: float,
    comm_period: int,
    steps: int,
    seed: int = 0,
) -> list[ReplicatedCenterLoop]:
    """Every rank's loop, run to the end as threads over a :class:`ThreadSum`."""
    ranks: list[tuple[ElasticWorker, GradientFn]] = []
    for rank, start in enumerate(starts):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + rank)  # the simulator's
        role = ElasticWorker(
            start, comm_period=comm_period, learning_rate=learning_rate, momentum=momentum
        )
        ranks.append((role, lambda point, g=generator: objective.gradient(point, g)))
    return run_loops(ranks, center, moving_rate=moving_rate, steps=steps)


def run_loops(
    ranks: list[tuple[ElasticWorker, GradientFn]],
    center: Tensor,
    *,
    moving_rate: float,
    steps: int,
    options: Callable[[int], dict[str, Any]] = lambda rank: {},
    before_run: Callable[[list[ReplicatedCenterLoop]], None] = lambda loops: None,
) -> list[ReplicatedCenterLoop]:
    """One :class:`ReplicatedCenterLoop` per (role, gradient), run to the end as threads
    (``options(rank)``: that rank's extra keyword arguments; ``before_run`` sees the loops)."""
    p = len(ranks)
    reducer = ThreadSum(p)
    loops = [
        ReplicatedCenterLoop(
            role,
            center,
            reducer.for_rank(rank),
            gradient,
            rank=rank,
            num_workers=p,
            moving_rate=moving_rate,
            steps=steps,
            **options(rank),
        )
        for rank, (role, gradient) in enumerate(ranks)
    ]
    before_run(loops)
    errors: list[BaseException] = []

    def target(loop: ReplicatedCenterLoop) -> None:
        try:
            loop.run()
        except BaseException as err:  # surfaced below
            errors.append(err)
            reducer.barrier.abort()

    threads = [threading.Thread(target=target, args=(loop,)) for loop in loops]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    return loops


def test_exchange_hand_computed_keeps_every_copy_equal() -> None:
    # two ranks, alpha = 0.25, center 1: e_0 = 0.25 (3 - 1) = 0.5, e_1 = 0.25 (-1 - 1) = -0.5
    center = f64(1.0)
    diffs = [
        alg.elastic_difference(f64(3.0), center, moving_rate=0.25),
        alg.elastic_difference(f64(-1.0), center, moving_rate=0.25),
    ]
    results = [
        alg.replicated_center_exchange(
            x, center, moving_rate=0.25, reduce_sum=lambda d: diffs[0] + diffs[1]
        )
        for x in (f64(3.0), f64(-1.0))
    ]
    assert [float(d) for d, _ in results] == [0.5, -0.5]
    # x~ <- (1 - beta) x~ + beta mean(x_old), beta = p alpha = 0.5: 0.5 * 1 + 0.5 * 1 = 1
    assert [float(c) for _, c in results] == [1.0, 1.0]
    assert float(alg.apply_to_worker(f64(3.0), results[0][0])) == 2.5


def test_conserved_quantity_counts_the_center_once() -> None:
    # learning rate 0: only exchanges move anything, and the ranks start apart from the center
    starts = [f64(2.0, -1.0), f64(0.5, 4.0), f64(-3.0, 1.0)]
    center = f64(0.0, 0.0)
    loops = run_threads(
        starts,
        center,
        Quadratic(center, noise_std=1.0),
        learning_rate=0.0,
        momentum=0.0,
        moving_rate=0.2,
        comm_period=1,
        steps=30,
    )
    p = len(loops)
    workers = sum(loop.role.params for loop in loops)
    copies = [loop.center for loop in loops]
    assert all(torch.equal(copy, copies[0]) for copy in copies)  # every copy is the same
    assert not torch.allclose(copies[0], center, atol=0.1)  # the center did move
    # the workers lose sum_j e_j and the center gains it: sum_i x_i + x~ is conserved ...
    assert torch.allclose(workers + copies[0], sum(starts) + center, rtol=0, atol=1e-12)
    # ... while counting every copy, sum_i x_i + p x~, grows by (p - 1) (x~ - x~_0)
    grown = workers + p * copies[0] - (sum(starts) + p * center)
    assert torch.allclose(grown, (p - 1) * (copies[0] - center), rtol=0, atol=1e-12)


@pytest.mark.parametrize(("name", "momentum"), [("easgd", 0.0), ("eamsgd", 0.9)])
def test_threads_match_the_simulators_synchronous_schedule_bit_for_bit(
    name: str, momentum: float
) -> None:
    start = torch.linspace(-2, 2, 5, dtype=torch.float64)
    objective = Quadratic(start, curvature=torch.linspace(0.5, 1.5, 5), noise_std=0.5)
    config = AlgorithmConfig(name=name, learning_rate=0.05, momentum=momentum, moving_rate=0.15)
    p, tau, steps = 3, 2, 41
    result = simulate(
        config,
        SimConfig(num_workers=p, comm_period=tau, schedule="synchronous", duration=steps, seed=4),
        objective,
    )
    loops = run_threads(
        [start] * p,
        start,
        objective,
        learning_rate=0.05,
        momentum=momentum,
        moving_rate=0.15,
        comm_period=tau,
        steps=steps,
        seed=4,
    )
    assert loops[0].rounds == (steps + tau - 1) // tau  # t = 0, 2, ..., 40
    for loop, want in zip(loops, result.workers, strict=True):
        assert torch.equal(loop.center, result.evaluated)
        assert torch.equal(loop.role.params, want)


@pytest.mark.parametrize(
    ("name", "momentum"),
    [("easgd", 0.0), ("eamsgd", 0.9), ("localsgd", 0.0), ("localsgd", 0.9), ("diloco", 0.0)],
)
def test_runtime_ranks_on_a_real_model_match_the_simulator_bit_for_bit(
    name: str, momentum: float
) -> None:
    # what run_allreduce builds: the look-ahead written into the model's own parameters
    # (scratch), gradients as per-parameter pieces, the exchange applied in place; the simulator
    # takes flat gradients at copies of the point. A gradient taken after the elastic move, or a
    # look-ahead clobbered by the exchange, would show here. (local SGD / DiLoCo: issue 20)
    from easgd.data.digits import load_digits_split
    from easgd.data.sampling import MinibatchSampler
    from easgd.engine.allreduce import rank_round, rank_worker, sampled_gradient
    from easgd.flat import FlatModel
    from easgd.parts.build import build_model
    from easgd.sim import ClassifierObjective

    split = load_digits_split(test_fraction=0.2, seed=0)
    model_config = TrainConfig().model
    rate = {"moving_rate": 0.2} if name in ("easgd", "eamsgd") else {}
    config = AlgorithmConfig(name=name, learning_rate=0.05, momentum=momentum, **rate)
    p, tau, steps = 2, 3, 13
    ranks: list[tuple[ElasticWorker, GradientFn]] = []
    for rank in range(p):
        flat = FlatModel(build_model(model_config, split, seed=0))
        sampler = MinibatchSampler(split, batch_size=128, worker_index=rank, num_workers=p)
        role = rank_worker(config, flat, comm_period=tau)
        assert role.lookahead.data_ptr() == flat.flat_params.data_ptr()
        assert (role.params.data_ptr() == flat.flat_params.data_ptr()) == (momentum == 0)
        ranks.append((role, sampled_gradient(flat, sampler)))
    start = ranks[0][0].params.clone()
    loops = run_loops(
        ranks,
        start,
        moving_rate=0.2,
        steps=steps,
        options=lambda rank: {"rule": rank_round(config, start, num_workers=p, measure=False)},
    )
    objective = ClassifierObjective(build_model(model_config, split, seed=0), split)
    sim = simulate(
        config,
        SimConfig(num_workers=p, comm_period=tau, schedule="synchronous", duration=steps),
        objective,
    )
    assert loops[0].rounds == 5  # t = 0, 3, 6, 9, 12
    assert not torch.equal(loops[0].center, start)
    for loop, want in zip(loops, sim.workers, strict=True):
        assert torch.equal(loop.center, sim.evaluated)
        assert torch.equal(loop.role.params, want)


def test_rank_worker_refuses_a_non_elastic_algorithm() -> None:
    from easgd.engine.allreduce import rank_worker
    from easgd.flat import FlatModel

    flat = FlatModel(torch.nn.Linear(3, 2))
    with pytest.raises(
        ValueError, match="runs synchronous easgd/eamsgd/localsgd/diloco, not 'downpour'"
    ):
        rank_worker(AlgorithmConfig(name="downpour"), flat, comm_period=2)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"algorithm": AlgorithmConfig(name="downpour")}, "topology=allreduce runs synchronous"),
        ({"worker_failure": "continue"}, "worker_failure='continue' is not supported"),
        ({"max_update_norm": 5.0}, "max_update_norm=5.0 is not supported"),
        ({"topology": "ring"}, "topology='ring'; allowed: server, allreduce"),
    ],
)
def test_allreduce_rejects_what_it_cannot_honour(overrides: dict, message: str) -> None:
    fields = {"topology": "allreduce", **overrides}
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        TrainConfig(**fields)


def test_world_size_has_no_server_rank() -> None:
    assert TrainConfig(topology="allreduce", workers=3).world_size == 3
    assert TrainConfig(workers=3).world_size == 4


@pytest.mark.slow
def test_torchrun_job_killed_restarts_resumes_and_equals_the_simulator(tmp_path: Path) -> None:
    from easgd.data.digits import load_digits_split
    from easgd.parts.build import build_model
    from easgd.recovery.checkpoint import Checkpointer
    from easgd.recovery.snapshot import SnapshotLog
    from easgd.sim import ClassifierObjective
    from tests.test_train_e2e import run

    steps, tau = 80, 4
    args = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "--max-restarts=1", "-m", "easgd.train", "topology=allreduce", "workers=2",
        "algorithm=eamsgd", f"steps_per_worker={steps}", f"comm.period={tau}",
        "checkpoint.every_s=0.0001", "fault.kill_rank=1", "fault.kill_at_step=50",
        "eval_interval_s=0.05", "progress=false", f"hydra.run.dir={tmp_path}",
    ]  # fmt: skip
    result = run(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 1 sends itself SIGKILL at step 50" in result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert_summary_shape(summary, topology="allreduce")
    assert summary["topology"] == "allreduce" and summary["restarts"] == 1
    assert (
        0 < summary["details"]["resumed_step"] <= 50
    )  # resumed from a checkpoint, not from scratch
    assert summary["worker_steps"] == 2 * steps
    assert summary["exchanges"] == 2 * (steps // tau)  # t = 0, 4, ..., 76 on each rank
    assert summary["test_error"] < 0.2
    with open(tmp_path / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert int(rows[-1]["exchanges"]) == summary["exchanges"]
    assert float(rows[0]["test_error"]) > summary["test_error"]
    # the resumed job's center is the uninterrupted synchronous schedule's, bit for bit
    # (same model seed, same per-worker minibatch streams; p = 2 makes the all-reduce's sum order
    # irrelevant, since a + b == b + a exactly)
    directory = tmp_path / "checkpoints"  # the final snapshot is the newest committed one
    final = Checkpointer(directory, "rank0").load(SnapshotLog(directory).committed()[-1])
    assert final is not None
    split = load_digits_split(test_fraction=0.2, seed=0)
    objective = ClassifierObjective(build_model(TrainConfig().model, split, seed=0), split)
    config = AlgorithmConfig(name="eamsgd", learning_rate=0.01, momentum=0.99)
    sim = simulate(
        config,
        SimConfig(num_workers=2, comm_period=tau, schedule="synchronous", duration=steps),
        objective,
    )
    assert final["role"]["step"] == steps
    assert torch.equal(final["center"], sim.evaluated)
    assert torch.equal(final["role"]["params"], sim.workers[0])


# -- snapshots on the run's snapshot log -------------------------------------------------------
def test_snapshots_are_committed_once_every_rank_has_saved_its_part(tmp_path: Path) -> None:
    from easgd.recovery.allreduce_snapshots import RankSnapshots
    from easgd.recovery.checkpoint import Checkpointer
    from easgd.recovery.snapshot import SnapshotLog

    directory = tmp_path / "checkpoints"
    Checkpointer(directory, "rank1").save({"stale": True}, 7)  # a crashed attempt's, uncommitted
    p, tau, steps = 3, 2, 12  # exchanges at t = 0, 2, ..., 10
    objective = Quadratic(f64(1.0, -2.0, 0.5), curvature=f64(0.5, 1.0, 1.5), noise_std=0.5)
    ranks: list[tuple[ElasticWorker, GradientFn]] = []
    for rank in range(p):
        generator = torch.Generator().manual_seed(rank)
        role = ElasticWorker(f64(0.0, 0.0, 0.0), comm_period=tau, learning_rate=0.1, momentum=0.0)
        ranks.append((role, lambda point, g=generator: objective.gradient(point, g)))
    snapshots = [RankSnapshots(directory, rank, num_workers=p, keep=3) for rank in range(p)]
    calls = [0]

    def decide() -> tuple[bool, bool]:  # rank 0: start snapshots at the 2nd and 4th exchanges
        calls[0] += 1
        return calls[0] in (2, 4), False

    def capture(loop: ReplicatedCenterLoop) -> Callable[[], dict[str, Any]]:
        return lambda: {"role": loop.role.state_dict(), "center": loop.center.clone()}

    def bind(loops: list[ReplicatedCenterLoop]) -> None:
        for loop, rank_snapshots in zip(loops, snapshots, strict=True):
            rank_snapshots.capture = capture(loop)

    def options(rank: int) -> dict[str, Any]:
        return {"snapshots": snapshots[rank], "decide": decide if rank == 0 else None}

    run_loops(
        ranks, f64(0.0, 0.0, 0.0), moving_rate=0.2, steps=steps, options=options, before_run=bind
    )
    # numbered above every file on disk; 8 committed at the exchange after it was saved (t = 4),
    # 9 at t = 8; the stale part 7 pruned
    assert SnapshotLog(directory).committed() == [8, 9]
    assert [s.committed for s in snapshots] == [9, 9, 9]
    assert not (directory / "rank1-00000007.pt").exists()
    for number, step in ((8, 3), (9, 7)):  # saved after the step that followed the exchange
        parts = [Checkpointer(directory, f"rank{r}").load(number) for r in range(p)]
        assert all(part is not None and part["role"]["step"] == step for part in parts)
        assert all(torch.equal(part["center"], parts[0]["center"]) for part in parts)  # type: ignore[index]


def test_a_snapshot_is_committed_only_when_the_sum_says_every_part_is_saved(
    tmp_path: Path,
) -> None:
    from easgd.recovery.allreduce_snapshots import RankSnapshots
    from easgd.recovery.snapshot import SnapshotLog

    snapshots = RankSnapshots(tmp_path, 0, num_workers=2, keep=3, capture=lambda: {"x": 1})
    snapshots.save(5)
    snapshots.exchanged(5.0 + 4.0)  # the other rank has saved only snapshot 4
    assert snapshots.committed is None and SnapshotLog(tmp_path).committed() == []
    snapshots.exchanged(5.0 + 5.0)
    assert snapshots.committed == 5 and SnapshotLog(tmp_path).committed() == [5]
    assert snapshots.next_number == 6


def test_resume_reads_the_newest_committed_part_and_numbers_above_every_file(
    tmp_path: Path,
) -> None:
    from easgd.recovery.allreduce_snapshots import RankSnapshots
    from easgd.recovery.checkpoint import Checkpointer, CheckpointError
    from easgd.recovery.snapshot import SnapshotLog

    for number in (3, 4):  # 4 was saved by rank 0 but never committed
        Checkpointer(tmp_path, "rank0").save({"number": number, "signature": {"a": 1}}, number)
    SnapshotLog(tmp_path).commit(3)
    snapshots = RankSnapshots(tmp_path, 0, num_workers=2, keep=3)
    state = snapshots.resume({"a": 1})
    assert state is not None and state["number"] == 3 and snapshots.next_number == 5
    with pytest.raises(CheckpointError, match="written by a different run"):
        snapshots.resume({"a": 2})
    with pytest.raises(CheckpointError, match="snapshot 3 is committed but .*rank1-00000003.pt"):
        RankSnapshots(tmp_path, 1, num_workers=2, keep=3).resume({"a": 1})
