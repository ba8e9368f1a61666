"""``mode=simulate``: a training config on the virtual clock, with the outputs of a real run."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from easgd.config.algorithm import AlgorithmConfig
from easgd.config.schema import CommConfig, CostConfig, DataConfig, ModelConfig, TrainConfig
from easgd.topologies.simulate import run_simulated
from tests.summary_shape import assert_summary_shape

ROOT = Path(__file__).resolve().parents[1]


def small_config(tmp_path: Path, **changes: object) -> TrainConfig:
    fields: dict[str, object] = dict(
        algorithm=AlgorithmConfig("downpour", learning_rate=0.1),
        model=ModelConfig(name="mlp", hidden=[16]),
        data=DataConfig(name="digits"),
        comm=CommConfig(period=1),
        cost=CostConfig(name="test", latency_us=250.0, service_us=500.0, step_time_s=1e-3),
        mode="simulate",
        workers=1,
        steps_per_worker=30,
        eval_interval_s=0.01,
        progress=False,
        tensorboard=False,
        run_dir=str(tmp_path),
    )
    fields.update(changes)
    return TrainConfig(**fields)  # type: ignore[arg-type]


def read_metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def test_one_worker_pays_each_round_trip_on_the_virtual_clock(tmp_path: Path) -> None:
    # step 1 ms; round trip 2 x 0.25 ms + 0.5 ms service = 1 ms: every step (tau = 1) takes 2 ms
    summary = run_simulated(small_config(tmp_path))
    assert_summary_shape(summary, topology="server", mode="simulate")
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert summary["worker_steps"] == 30 and summary["exchanges"] == 30
    assert summary["stop_reason"] == "steps"
    assert summary["wall_time_s"] == pytest.approx(30 * 2e-3)
    assert summary["details"]["charges_in_steps"] == pytest.approx(
        {"latency": 0.25, "transfer": 0.0, "service": 0.5}
    )
    rows = read_metrics(tmp_path)
    # evaluations every 10 ms of virtual time = every 5 steps, then the final one
    assert [float(r["wall_s"]) for r in rows] == pytest.approx(
        [0.0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06]
    )
    assert [int(r["worker_steps"]) for r in rows[:-1]] == [0, 5, 10, 15, 20, 25]
    assert json.loads((tmp_path / "summary.json").read_text())["test_error"] == float(
        rows[-1]["test_error"]
    )


def test_target_and_virtual_wall_budget_stop_a_simulated_run(tmp_path: Path) -> None:
    by_budget = run_simulated(small_config(tmp_path / "a", steps_per_worker=10**6, max_wall_s=0.02))
    assert by_budget["stop_reason"] == "max_wall_s"
    assert by_budget["worker_steps"] == 10  # 2 ms a step
    by_target = run_simulated(small_config(tmp_path / "b", target_test_error=0.75))
    assert by_target["stop_reason"] == "target_test_error"
    assert by_target["test_error"] <= 0.75 and by_target["worker_steps"] < 30


def test_what_the_simulator_does_not_model_is_rejected_by_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="data.sampling=whole"):
        run_simulated(small_config(tmp_path, data=DataConfig(name="digits", sampling="shard")))
    with pytest.raises(ValueError, match="mode="):
        small_config(tmp_path, mode="virtual")


@pytest.mark.slow
def test_hydra_sweep_in_simulate_mode_writes_runs_table_events_and_plot(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EASGD_CACHE_DIR": str(tmp_path / "cache")}
    command = [
        sys.executable, "-m", "easgd.train", "-m", "mode=simulate", "cost=zero",
        "cost.step_time_s=0.001", "model.hidden=[16]", "steps_per_worker=30",
        "eval_interval_s=0.01", "progress=false", "algorithm=eamsgd,downpour",
        "algorithm.learning_rate=0.05", "comm.period=1,4", f"hydra.sweep.dir={sweep}",
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with open(sweep / "sweep.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted((r["algorithm"], r["comm_period"]) for r in rows) == [
        ("downpour", "1"), ("downpour", "4"), ("eamsgd", "1"), ("eamsgd", "4"),
    ]  # fmt: skip
    for row in rows:
        run = sweep / row["run"]
        summary = json.loads((run / "summary.json").read_text())
        assert row["mode"] == summary["mode"] == "simulate"
        # 4 workers x 30 steps; an exchange at steps 0, tau, 2 tau, ... < 30
        period = int(row["comm_period"])
        assert summary["worker_steps"] == 120
        assert summary["exchanges"] == 4 * len(range(0, 30, period))
        # free exchanges: the virtual clock is 30 steps of 1 ms
        assert summary["wall_time_s"] == pytest.approx(0.03)
        metrics = read_metrics(run)
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(run / "tb"))
        events.Reload()
        errors = [s.value for s in events.Scalars("center/test_error")]
        assert errors == pytest.approx([float(r["test_error"]) for r in metrics])
    plotted = subprocess.run(
        [sys.executable, "-m", "easgd.plot", str(sweep), "--out", str(tmp_path / "p.png")],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert plotted.returncode == 0, plotted.stderr[-2000:]
    assert (tmp_path / "p.png").stat().st_size > 10_000
    # the legends name what the sweep varied, nothing else
    from easgd.plot import find_runs, labels

    assert sorted(labels(find_runs([sweep]))) == [
        "algorithm=downpour period=1", "algorithm=downpour period=4",
        "algorithm=eamsgd period=1", "algorithm=eamsgd period=4",
    ]  # fmt: skip
    with open(sweep / "sweep_by_seed.csv") as handle:
        by_seed = list(csv.DictReader(handle))
    assert sorted((r["algorithm"], r["comm.period"], r["runs"]) for r in by_seed) == [
        ("downpour", "1", "1"), ("downpour", "4", "1"), ("eamsgd", "1", "1"), ("eamsgd", "4", "1"),
    ]  # fmt: skip
