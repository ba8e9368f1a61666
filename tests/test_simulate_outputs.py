"""What a ``mode=simulate`` run writes: its folder in the log, worker tags like a real run's."""

from __future__ import annotations

import logging
import os
import statistics
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from easgd.config.algorithm import AlgorithmConfig
from easgd.config.schema import CommConfig
from easgd.parts.runlog import RunLog
from easgd.topologies.simulate import build_simulation, run_simulated
from easgd.topologies.simulate_tags import WorkerTags
from tests.test_simulate_mode import small_config


def scalars(run: Path) -> EventAccumulator:
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    return events


def test_worker_tags_carry_each_exchange_s_mean_loss_and_elastic_distance(tmp_path: Path) -> None:
    cfg = small_config(
        tmp_path,
        algorithm=AlgorithmConfig("eamsgd", learning_rate=0.05),
        comm=CommConfig(period=4),
        workers=2,
        tensorboard=True,
    )
    simulator, figures = build_simulation(cfg)
    losses: dict[int, list[float]] = {0: [], 1: []}
    simulator.on_gradient.append(lambda worker, loss: losses[worker].append(loss))
    runlog = RunLog(tmp_path)
    WorkerTags(simulator, runlog, figures.step_time_s)
    simulator.run()
    runlog.close()
    events = scalars(tmp_path)
    worker_tags = {t for t in events.Tags()["scalars"] if t.startswith("worker")}
    assert worker_tags == {
        f"worker{r}/{k}" for r in (1, 2) for k in ("train_loss", "elastic_distance")
    }
    for rank in (1, 2):
        loss = events.Scalars(f"worker{rank}/train_loss")
        assert [e.step for e in loss] == list(range(0, 30, 4))  # exchanges at t = 0, 4, ..., 28
        seen = losses[rank - 1]
        expected = [0.0] + [statistics.fmean(seen[t - 4 : t]) for t in range(4, 30, 4)]
        assert [e.value for e in loss] == pytest.approx(expected, rel=1e-6)  # float32 on disk
        distance = events.Scalars(f"worker{rank}/elastic_distance")
        assert [e.step for e in distance] == list(range(0, 30, 4))
        assert distance[0].value == 0.0  # every worker starts at the center


def test_a_simulated_run_names_its_folder_and_writes_its_tags(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = small_config(tmp_path, workers=2, tensorboard=True)
    with caplog.at_level(logging.INFO, logger="easgd"):
        summary = run_simulated(cfg)
    lines = [r.getMessage() for r in caplog.records if "run directory" in r.getMessage()]
    assert lines == [
        f"downpour simulated (cost profile test) with 2 workers, tau=1, {summary['num_params']} "
        f"parameters; run directory {os.path.abspath(tmp_path)}"
    ]
    tags = set(scalars(tmp_path).Tags()["scalars"])
    assert {"worker1/train_loss", "worker2/train_loss", "center/test_error"} <= tags
    assert not {t for t in tags if t.endswith("elastic_distance")}  # downpour: not elastic
    # what simulate writes, and that it writes no checkpoints (the README must not say it does)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv", "summary.json", "tb"]


def test_a_simulated_sequential_baseline_writes_its_loss_every_step(tmp_path: Path) -> None:
    cfg = small_config(
        tmp_path, algorithm=AlgorithmConfig("sgd", learning_rate=0.1), tensorboard=True
    )
    run_simulated(cfg)
    steps = [e.step for e in scalars(tmp_path).Scalars("worker1/train_loss")]
    assert steps == list(range(1, 31))
