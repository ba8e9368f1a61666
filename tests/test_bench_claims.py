"""The claims benchmarks (momentum, flat minima, spread) in quick mode: the figures they write
follow their stated protocols, checked against the raw per-run records they cache."""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def run_quick(script: str, out: Path, *extra: str) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out", str(out), *extra],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def records(path: Path) -> dict[str, dict]:
    return {r["key"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_momentum_quick_tunes_by_its_protocol_and_pairs_the_effective_step_control(
    tmp_path: Path,
) -> None:
    run_quick("momentum.py", tmp_path)
    summary = json.loads((tmp_path / "momentum_quick.json").read_text())
    plan, rows = summary["plan"], summary["rows"]
    runs = records(tmp_path / "momentum_quick_runs.jsonl")
    assert {(r["delta"], r["tau"], r["p"]) for r in rows} == {(0.0, 10, 4), (0.9, 10, 4)}
    threshold = plan["threshold"]
    for row in rows:
        d = row["delta"]
        grid = [
            r for r in runs.values()
            if r["delta"] == d and r["seed"] == plan["tune_seed"] and r["tau"] == row["tau"]
        ]  # fmt: skip
        assert sorted(round(r["eta_eff"], 9) for r in grid) == sorted(plan["effective_steps"])

        def rank(r: dict) -> tuple:
            stays = not r["diverged"] and r["final_test_error"] <= threshold
            t = r["time_to_threshold"]
            return (not stays, float("inf") if t is None else t, r["best_test_error"])

        assert row["eta"] == pytest.approx(min(grid, key=rank)["eta"])
        assert row["eta_eff"] == pytest.approx(row["eta"] / (1 - d))
        confirm = [
            r for r in runs.values()
            if r["seed"] in plan["confirm_seeds"] and r["delta"] == d
            and r["eta"] == pytest.approx(row["eta"])
        ]  # fmt: skip
        assert len(confirm) == 1 and row["time"] == confirm[0]["time_to_threshold"]
        control = [
            r for r in runs.values()
            if r["seed"] in plan["confirm_seeds"] and r["delta"] == 0.0
            and r["eta"] == pytest.approx(row["eta_eff"])
        ]  # fmt: skip
        assert len(control) == 1 and row["control_time"] == control[0]["time_to_threshold"]
        curve = confirm[0]["curve"]
        first = next((t for t, err in curve if err <= threshold), None)
        assert row["time"] == first
    for run in runs.values():  # travel is measured between exchanges: tau steps at least
        assert run["mean_travel"] > 0 and run["mean_distance"] >= 0
    assert (tmp_path / "momentum_quick.png").stat().st_size > 10_000


def test_flat_minima_quick_stops_at_the_target_and_measures_that_point(tmp_path: Path) -> None:
    run_quick("flat_minima.py", tmp_path)
    result = json.loads((tmp_path / "flat_minima_quick.json").read_text())
    plan, runs = result["plan"], result["runs"]
    assert {r["method"] for r in runs} == {"SGD", "MSGD", "DOWNPOUR", "EASGD", "EAMSGD"}
    for run in runs:
        if run["reached_target"]:
            assert run["train_loss"] <= plan["target_train_loss"]
        else:
            assert run["time"] == plan["max_duration"]
        # early-stopped quick points are not minima, so small kicks can lower the loss (the
        # gradient term); the largest kick must raise it most, in both scalings
        for key in ("perturbation_relative", "perturbation_filter"):
            assert len(run[key]) == len(plan["radii"])
            assert run[key][-1] > max(run[key][0], 0.0)
        assert run["top_eigenvalue"] > 0
    assert sum(r["reached_target"] for r in runs) >= 3
    rows = {r["method"]: r for r in result["summary"]}
    for method, row in rows.items():
        mine = [r["test_error"] for r in runs if r["method"] == method]
        assert row["test_error"] == pytest.approx(statistics.fmean(mine))
    assert (tmp_path / "flat_minima_quick.png").stat().st_size > 10_000


def test_spread_quick_summarizes_its_runs(tmp_path: Path) -> None:
    run_quick("spread.py", tmp_path)
    result = json.loads((tmp_path / "spread_quick.json").read_text())
    runs = result["runs"]
    assert sorted({(r["width"], r["seed"]) for r in runs}) == [
        (w, s) for w in (4, 16) for s in (0, 1, 2)
    ]
    for row in result["summary"]:
        losses = [r["test_loss"] for r in runs if r["width"] == row["width"]]
        assert row["test_loss_mean"] == pytest.approx(statistics.fmean(losses))
        assert row["test_loss_std"] == pytest.approx(statistics.stdev(losses))
    with open(tmp_path / "spread_quick.csv") as handle:
        assert [int(r["width"]) for r in csv.DictReader(handle)] == [4, 16]


def test_spread_benchmark_runs_exactly_what_the_hydra_sweep_runs(tmp_path: Path) -> None:
    """The same (width, seed) through `python -m easgd.train -m experiment=spread` and through
    the benchmark's in-process runner gives the same final losses; --from-sweep reads them."""
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, "-m", "easgd.train", "-m", "experiment=spread", "seed=0,1",
         "model.hidden=[4]", "steps_per_worker=40", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import spread
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from_sweep = sorted(spread.from_sweep(sweep), key=lambda r: r["seed"])
    assert [r["seed"] for r in from_sweep] == [0, 1]
    for row in from_sweep:
        mine = spread.run_one(width=4, seed=row["seed"], overrides=["steps_per_worker=40"])
        assert mine == row
    assert spread.sweep_grid() == ([4, 16, 64, 256], list(range(30)))
