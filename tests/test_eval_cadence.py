"""The evaluation interval in seconds or in worker steps; simulated runs get a curve by default."""

from __future__ import annotations

import csv
import queue
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch import Tensor

from easgd.comm.message import Header, Op
from easgd.config.algorithm import AlgorithmConfig
from easgd.config.schema import TrainConfig
from easgd.engine.server import ParameterServer, ServePolicy
from easgd.engine.supervisor import Supervision, Supervisor
from easgd.parts.assembly import SIMULATE_EVAL_POINTS, EvalCadence, eval_every
from easgd.parts.runlog import RunLog
from easgd.roles import ElasticServer
from easgd.topologies.simulate import run_simulated
from tests.test_simulate_mode import read_metrics, small_config

NUMEL = 4


def test_a_step_cadence_evaluates_at_each_multiple_once() -> None:
    cadence = EvalCadence(None, 5)
    assert cadence.due(0.0, steps=0)  # the start
    cadence.done(0.0, steps=0)
    assert [s for s in range(1, 12) if cadence.due(99.0, steps=s)] == [5, 6, 7, 8, 9, 10, 11]
    cadence.done(0.0, steps=7)  # evaluated late, at 7: the next is at 10, not at 12
    assert (cadence.due(0.0, steps=9), cadence.due(0.0, steps=10)) == (False, True)
    assert cadence.wait_s(0.0) == float("inf")
    timed = EvalCadence(2.0)
    timed.done(3.0)
    assert (timed.due(4.9), timed.due(5.0), timed.wait_s(4.5)) == (False, True, 0.5)


def test_which_interval_a_run_uses() -> None:
    base = dict(workers=4, steps_per_worker=1000)
    assert eval_every(TrainConfig(**base)) == (1.0, None)  # type: ignore[arg-type]
    assert eval_every(TrainConfig(eval_interval_s=0.5, **base)) == (0.5, None)  # type: ignore[arg-type]
    steps = TrainConfig(eval_interval_s=0.5, eval_interval_steps=40, **base)  # type: ignore[arg-type]
    assert eval_every(steps) == (None, 40)  # steps win
    simulated = TrainConfig(mode="simulate", **base)  # type: ignore[arg-type]
    assert eval_every(simulated) == (None, 4 * 1000 // SIMULATE_EVAL_POINTS)
    sequential = TrainConfig(mode="simulate", algorithm=AlgorithmConfig("sgd"), **base)  # type: ignore[arg-type]
    assert eval_every(sequential) == (None, 20)  # one worker: 1000 / 50


@pytest.mark.parametrize("bad", [0, -3, True])
def test_a_bad_step_interval_is_one_line_naming_the_key(bad: object) -> None:
    with pytest.raises(ValueError, match=r"^eval_interval_steps must be an integer >= 1"):
        TrainConfig(eval_interval_steps=bad)  # type: ignore[arg-type]


def test_a_simulated_run_has_a_curve_by_default(tmp_path: Path) -> None:
    # 2 workers x 100 steps, no interval given: an evaluation every 200 / 50 = 4 worker steps
    cfg = small_config(tmp_path, workers=2, steps_per_worker=100, eval_interval_s=None)
    summary = run_simulated(cfg)
    rows = read_metrics(tmp_path)
    assert [int(r["worker_steps"]) for r in rows] == list(range(0, 201, 4))
    assert len(rows) == SIMULATE_EVAL_POINTS + 1 and summary["worker_steps"] == 200


def test_a_simulated_run_evaluates_every_given_steps(tmp_path: Path) -> None:
    cfg = small_config(tmp_path, workers=2, steps_per_worker=30, eval_interval_steps=25)
    run_simulated(cfg)
    assert [int(r["worker_steps"]) for r in read_metrics(tmp_path)] == [0, 25, 50, 60]


class GatedTransport:
    """A worker's pair as the server sees it: a HELLO, then what the test puts in ``inbox``."""

    def __init__(self) -> None:
        self.numel = NUMEL
        self.recv_timeout_s = 60.0
        self.inbox: queue.Queue[tuple[Header, Tensor | None]] = queue.Queue()

    def recv_control(self) -> tuple[Header, Tensor | None]:
        return Header(Op.HELLO, num_params=NUMEL), None

    def recv(self) -> tuple[Header, Tensor | None]:
        return self.inbox.get(timeout=60)

    def send(self, header: Header, payload: Tensor | None = None) -> None:
        pass

    send_control = send


def test_the_supervisor_evaluates_at_each_multiple_of_the_worker_steps(tmp_path: Path) -> None:
    transport = GatedTransport()
    role = ElasticServer(torch.zeros(NUMEL, dtype=torch.float64), moving_rate=0.5)
    server = ParameterServer(role, {1: transport}, ServePolicy())  # type: ignore[dict-item]
    evaluated: queue.Queue[int] = queue.Queue()

    def evaluate(point: Tensor) -> dict[str, float]:
        evaluated.put(server.stats[1].steps)
        return {"test_loss": 0.0, "test_error": 0.5}

    settings = Supervision(eval_interval_s=None, eval_interval_steps=5)
    supervisor = Supervisor(server, evaluate, RunLog(tmp_path, tensorboard=False), settings)
    outcome: list[object] = []
    thread = threading.Thread(target=lambda: outcome.append(supervisor.run()))
    thread.start()
    assert evaluated.get(timeout=60) == 0  # the start
    payload = torch.ones(NUMEL, dtype=torch.float64)
    for step in range(1, 13):
        transport.inbox.put((Header(Op.EXCHANGE, step=step), payload))
        if step % 5 == 0:  # due: wait for it before the worker goes on
            assert evaluated.get(timeout=60) == step
    transport.inbox.put((Header(Op.DONE, step=12), None))
    thread.join(timeout=60)
    supervisor.runlog.close()
    assert evaluated.get(timeout=60) == 12  # the end
    with open(tmp_path / "metrics.csv") as handle:
        steps = [int(r["worker_steps"]) for r in csv.DictReader(handle)]
    assert steps == [0, 5, 10, 12]  # no evaluation between the multiples, however long it took


def metrics_steps(run: Path) -> list[int]:
    with open(run / "metrics.csv") as handle:
        return [int(r["worker_steps"]) for r in csv.DictReader(handle)]


@pytest.mark.slow
def test_a_sequential_baseline_evaluates_exactly_at_each_multiple(tmp_path: Path) -> None:
    from tests.test_train_e2e import run

    result = run(
        [sys.executable, "-m", "easgd.train", "algorithm=sgd", "steps_per_worker=100",
         "eval_interval_steps=25", "progress=false", f"hydra.run.dir={tmp_path}"],
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert metrics_steps(tmp_path) == [0, 25, 50, 75, 100]


@pytest.mark.slow
def test_all_reduce_evaluates_at_the_exchange_that_reaches_each_multiple(tmp_path: Path) -> None:
    from tests.test_train_e2e import run

    # 2 ranks exchange every 5 steps: 10 worker steps a round; a multiple of 20 every 2 rounds
    result = run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "easgd.train", "topology=allreduce", "workers=2", "algorithm=easgd",
         "steps_per_worker=40", "comm.period=5", "eval_interval_steps=20", "progress=false",
         f"hydra.run.dir={tmp_path}"],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert metrics_steps(tmp_path) == [0, 20, 40, 60, 80]
