"""Every ``fault.*`` kind on every topology and mode: it fires, or the config refuses it.

A rank is a process rank: with a server, ranks 0..k-1 are the server (k shards) and k..k+p-1 the
workers; under all-reduce ranks 0..p-1 are all workers; a sequential baseline is rank 0. A rank
outside the run's ranks is refused everywhere, and so is a worker's ``*_at_step`` outside
1..steps_per_worker (it would never fire).

=============  ==============  ==============  ==========  ============  ==============  ==========  ========
kind           server rank 0   server worker   shard       shard worker  all-reduce      sequential  simulate
=============  ==============  ==============  ==========  ============  ==============  ==========  ========
kill           fires (C1)      fires (C1, R4)  fires (S1)  fires (S1)    fires (A1)      fires (M2)  refused
raise          fires (R1)      fires (C2)      refused     fires (I)     fires (M3)      fires (M1)  refused
hang sigstop   refused         fires (R2)      refused     fires (I)     fires (M4)      refused     refused
hang loop      refused         fires (R2)      refused     fires (I)     fires (M4)      refused     refused
nan            refused         fires (C3, P1)  refused     fires (I)     fires (M5)      refused     refused
=============  ==============  ==============  ==========  ============  ==============  ==========  ========

Proofs of firing, each a real run that shows the fault and how the run ends:

- C1-C3: tests/test_chaos.py (server and worker SIGKILL + resume; a raising worker under
  ``worker_failure=continue``; a NaN worker refused and reset);
- R1, R2, R4: tests/test_reliability.py (the server's raise ends the run with its traceback; a
  hung or stuck worker, both hang modes, is lost to the heartbeat; a killed worker is lost);
- P1: tests/test_runtime_paths.py (a NaN reset with overlap);
- S1: tests/test_sharded.py (a killed shard, a killed worker: resume from the sharded snapshot);
- A1: tests/test_allreduce.py (a killed rank: restart, resume, equal to the simulator);
- M1-M5: here (sequential raise in process and kill for real; all-reduce raise, both hangs, nan);
- I: a sharded center's workers run the same worker loop, and so the same injector call, as the
  single server's (proven by S1's killed worker); :func:`test_injector_fires_each_kind_once`
  proves that call fires each kind at its step and rank.

Refused cells (and ranks that are not the run's) are checked here in process.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from easgd.config.algorithm import AlgorithmConfig
from easgd.config.schema import FaultConfig, ServerConfig, TrainConfig
from easgd.parts import faults as faults_module
from easgd.parts.faults import FaultInjector
from tests.test_reliability import kill_all, processes_of, torchrun_continuing_stopped
from tests.test_reliability import torchrun as reliability_torchrun
from tests.test_train_e2e import run

SERVER: dict[str, Any] = {"workers": 2}
SHARDED: dict[str, Any] = {"workers": 2, "server": ServerConfig(shards=2)}
ALLREDUCE: dict[str, Any] = {"workers": 2, "topology": "allreduce"}
SEQUENTIAL: dict[str, Any] = {"algorithm": AlgorithmConfig(name="sgd")}
SIMULATE: dict[str, Any] = {"workers": 2, "mode": "simulate"}
TOPOLOGIES = {
    "server": SERVER,
    "sharded": SHARDED,
    "allreduce": ALLREDUCE,
    "sequential": SEQUENTIAL,
    "simulate": SIMULATE,
}
KINDS = ("kill", "raise", "hang", "nan")


def config(topology: dict[str, Any], kind: str, rank: int, **fault: Any) -> TrainConfig:
    """A config of ``topology`` whose ``kind`` fault is armed on ``rank`` at step 5."""
    armed = {f"{kind}_rank": rank, f"{kind}_at_step": 5, **fault}
    return TrainConfig(steps_per_worker=50, fault=FaultConfig(**armed), **topology)


FIRES = [
    *[("server", kind, 1) for kind in KINDS],
    ("server", "kill", 0),
    ("server", "raise", 0),
    *[("sharded", kind, 2) for kind in KINDS],
    *[("sharded", "kill", shard) for shard in (0, 1)],
    *[("allreduce", kind, rank) for kind in KINDS for rank in (0, 1)],
    ("sequential", "kill", 0),
    ("sequential", "raise", 0),
]


@pytest.mark.parametrize(("topology", "kind", "rank"), FIRES)
def test_cells_that_fire_are_accepted(topology: str, kind: str, rank: int) -> None:
    cfg = config(TOPOLOGIES[topology], kind, rank)
    assert cfg.fault.armed() == {kind: rank}


REFUSED = [
    # (topology, kind, rank, the message's words)
    *[("simulate", kind, 1, f"fault.{kind}_rank=1: fault injection needs real processes; use mode=distributed") for kind in KINDS],  # noqa: E501
    ("server", "hang", 0, "fault.hang_rank=0 is a server rank (rank 0 is the server, ranks 1..2 the workers); a server fires only fault.kill_rank"),  # noqa: E501
    ("server", "nan", 0, "fault.nan_rank=0 is a server rank"),
    *[("sharded", kind, shard, f"fault.{kind}_rank={shard} is a server rank (ranks 0..1 are the shards, ranks 2..3 the workers)") for kind in ("raise", "hang", "nan") for shard in (0, 1)],  # noqa: E501
    ("sequential", "hang", 0, "fault.hang_rank=0: a sequential baseline has no server or peer to notice a hang"),  # noqa: E501
    ("sequential", "nan", 0, "fault.nan_rank=0: a sequential baseline has no server or peer to notice a nan"),  # noqa: E501
    # a rank that is not the run's, on every topology
    *[("server", kind, 3, f"fault.{kind}_rank=3 is not a rank of this run (rank 0 is the server, ranks 1..2 the workers)") for kind in KINDS],  # noqa: E501
    ("server", "kill", -1, "fault.kill_rank=-1 is not a rank of this run"),
    *[("sharded", kind, 4, f"fault.{kind}_rank=4 is not a rank of this run (ranks 0..1 are the shards, ranks 2..3 the workers)") for kind in KINDS],  # noqa: E501
    *[("allreduce", kind, 2, f"fault.{kind}_rank=2 is not a rank of this run (topology=allreduce has ranks 0..1, every one a worker)") for kind in KINDS],  # noqa: E501
    *[("sequential", kind, 1, f"fault.{kind}_rank=1 is not a rank of this run (a sequential baseline is one process, rank 0)") for kind in KINDS],  # noqa: E501
]  # fmt: skip


@pytest.mark.parametrize(("topology", "kind", "rank", "message"), REFUSED)
def test_cells_that_cannot_fire_are_refused_naming_the_key(
    topology: str, kind: str, rank: int, message: str
) -> None:
    with pytest.raises(ValueError) as refused:
        config(TOPOLOGIES[topology], kind, rank)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_the_example_of_a_rank_beyond_four_workers_is_refused() -> None:
    with pytest.raises(ValueError, match=r"fault.kill_rank=9 is not a rank of this run \(rank 0"):
        TrainConfig(workers=4, fault=FaultConfig(kill_rank=9, kill_at_step=5))


@pytest.mark.parametrize("at_step", [0, 51])
@pytest.mark.parametrize("topology", ["server", "sharded", "allreduce", "sequential"])
def test_a_worker_step_outside_the_budget_is_refused(topology: str, at_step: int) -> None:
    rank = 2 if topology == "sharded" else 0 if topology in ("allreduce", "sequential") else 1
    with pytest.raises(ValueError, match=rf"fault.kill_at_step={at_step} is not a local step"):
        config(TOPOLOGIES[topology], "kill", rank, kill_at_step=at_step)
    config(TOPOLOGIES[topology], "kill", rank, kill_at_step=50)  # the last step is one


@pytest.mark.parametrize("kind", KINDS)
def test_injector_fires_each_kind_once(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fired: list[tuple[str, int, str]] = []

    def record(what: str) -> Any:
        return lambda who, step, **_: fired.append((what, step, who))

    monkeypatch.setattr(faults_module, "kill_self", record("kill"))
    monkeypatch.setattr(faults_module, "hang_self", record("hang"))
    fault = FaultConfig(**{f"{kind}_rank": 2, f"{kind}_at_step": 3})
    for generation, rank in ((0, 2), (0, 1), (1, 2)):
        injector = FaultInjector(fault, rank, generation=generation, who=f"rank {rank}")
        for step in range(1, 6):
            params = torch.ones(4)
            try:
                injector.worker_step(step, params)
            except RuntimeError as err:
                assert str(err) == f"fault injection: rank {rank} raises at step {step}"
                fired.append(("raise", step, f"rank {rank}"))
            if torch.isnan(params).all():
                fired.append(("nan", step, f"rank {rank}"))
            else:
                assert torch.equal(params, torch.ones(4))
        if rank == 1 or (generation == 1 and kind != "nan"):  # nan fires in every start
            assert fired == [], (generation, rank)
        else:
            assert fired == [(kind, 3, "rank 2")], (generation, rank)
        fired.clear()


def test_a_kill_after_commit_waits_for_the_first_committed_snapshot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the kill is due from step 3 on, but fires only at the first step that sees a commit (6)
    # and only once; without the flag it fires at step 3 exactly, commit or not
    fired: list[int] = []
    monkeypatch.setattr(faults_module, "kill_self", lambda who, step: fired.append(step))
    commits = iter([False] * 3 + [True] * 10)  # asked at steps 3, 4, 5 (no), 6 (yes)
    fault = FaultConfig(kill_rank=1, kill_at_step=3, kill_after_commit=True)
    injector = FaultInjector(fault, 1, generation=0, committed=lambda: next(commits))
    for step in range(1, 7):
        injector.worker_step(step, torch.ones(2))
    assert fired == [6]
    fired.clear()
    updates = iter([False, True])  # a server rank: ticks at updates 5 (no commit) and 9
    server = FaultInjector(
        FaultConfig(kill_rank=0, kill_at_step=4, kill_after_commit=True),
        0,
        generation=0,
        committed=lambda: next(updates),
    )
    for count in (2, 5, 9):
        server.server_tick(count)
    assert fired == [9]
    fired.clear()
    plain = FaultInjector(FaultConfig(kill_rank=1, kill_at_step=3), 1, generation=0)
    for step in range(1, 7):
        plain.worker_step(step, torch.ones(2))
    assert fired == [3]


def test_sequential_raise_fires_in_the_run(tmp_path: Path) -> None:
    from easgd.topologies.sequential import run_sequential

    cfg = TrainConfig(
        algorithm=AlgorithmConfig(name="sgd"),
        steps_per_worker=20,
        fault=FaultConfig(raise_rank=0, raise_at_step=7),
        progress=False,
        tensorboard=False,
        run_dir=str(tmp_path),
    )
    with pytest.raises(
        RuntimeError, match=r"^fault injection: the sequential process raises at step 7$"
    ):
        run_sequential(cfg)
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.slow
def test_sequential_kill_fires_for_real(tmp_path: Path) -> None:
    result = run(
        [sys.executable, "-m", "easgd.train", "algorithm=sgd", "steps_per_worker=50",
         "fault.kill_rank=0", "fault.kill_at_step=5", "progress=false", "tensorboard=false",
         f"hydra.run.dir={tmp_path}"],
        timeout=120,
    )  # fmt: skip
    assert result.returncode == -9, result.stderr[-3000:]  # SIGKILL
    log = result.stdout + result.stderr  # one process: its log goes to the console
    assert "the sequential process sends itself SIGKILL at step 5" in log
    assert not (tmp_path / "summary.json").exists()


ALLREDUCE_RUN = ["topology=allreduce", "workers=2", "steps_per_worker=100000", "comm.period=2"]


@pytest.mark.slow
def test_allreduce_raise_ends_the_run_with_the_error(tmp_path: Path) -> None:
    result, _ = reliability_torchrun(
        2,
        *ALLREDUCE_RUN,
        "fault.raise_rank=1",
        "fault.raise_at_step=5",
        f"hydra.run.dir={tmp_path}",
    )
    assert result.returncode != 0
    assert "RuntimeError: fault injection: rank 1 raises at step 5" in result.stderr
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sigstop", "loop"])
def test_allreduce_hang_ends_the_run_at_the_collective_timeout(tmp_path: Path, mode: str) -> None:
    # rank 1 hangs after step 5; rank 0 waits for it in the next all-reduce until comm.timeout_s
    # (10 s: it also bounds the start-up rendezvous of a loaded machine)
    overrides = [*ALLREDUCE_RUN, "comm.timeout_s=10", "fault.hang_rank=1", "fault.hang_at_step=5",
                 f"fault.hang_mode={mode}", f"hydra.run.dir={tmp_path}"]  # fmt: skip
    try:
        if mode == "sigstop":
            result, _ = torchrun_continuing_stopped(
                2, *overrides, run_dir=tmp_path, failed="the all-reduce failed"
            )
        else:
            result, _ = reliability_torchrun(2, *overrides)
    finally:
        left = processes_of(str(tmp_path))
        kill_all(left)
    assert left == []  # no stopped or stuck rank outlives the run
    assert result.returncode != 0
    log = result.stderr
    hung = "rank 1 stops itself (SIGSTOP)" if mode == "sigstop" else "rank 1's training loop"
    assert f"fault injection: {hung}" in log
    assert "RuntimeError: the all-reduce failed: a rank died, or hung for comm.timeout_s" in log
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.slow
def test_allreduce_nan_stops_every_rank_with_an_error(tmp_path: Path) -> None:
    result, _ = reliability_torchrun(
        2, *ALLREDUCE_RUN, "fault.nan_rank=1", "fault.nan_at_step=5", f"hydra.run.dir={tmp_path}"
    )
    assert result.returncode != 0
    log = result.stderr
    assert "fault injection: rank 1 parameters set to NaN at step 5" in log
    # the exchange at step 6 (tau = 2) is the first with rank 1's NaN
    assert "FloatingPointError: the center became non-finite at exchange 4 (step 6): " in log
    assert not (tmp_path / "summary.json").exists()
