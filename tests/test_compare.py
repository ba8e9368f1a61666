"""Outputs that tell runs apart: legend labels from differing overrides, seed-aggregated sweep tables."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from easgd.compare import (
    RunInfo,
    differing_keys,
    legend_labels,
    load_run,
    parse_overrides,
    settings,
)
from easgd.plot import labels
from easgd.sweep import RunCurve, aggregate, default_target, write_tables


def test_overrides_parse_as_typed_without_hydra_or_presentation_keys() -> None:
    lines = ["algorithm=eamsgd", "+extra=1", "hydra.run.dir=x", "~cost", "progress=false", "seed=2"]
    assert parse_overrides(lines) == {"algorithm": "eamsgd", "extra": "1", "seed": "2"}


def test_labels_carry_only_the_keys_that_differ() -> None:
    table = [
        {"algorithm": "eamsgd", "algorithm.learning_rate": "0.05", "seed": "0"},
        {"algorithm": "eamsgd", "algorithm.learning_rate": "0.05", "seed": "1"},
        {"algorithm": "eamsgd", "algorithm.learning_rate": "0.1", "seed": "0"},
        {"algorithm": "eamsgd", "algorithm.learning_rate": "0.1", "seed": "1"},
    ]
    assert differing_keys(table) == ["algorithm.learning_rate", "seed"]
    assert legend_labels(table, ["x"] * 4) == [
        "learning_rate=0.05 seed=0",
        "learning_rate=0.05 seed=1",
        "learning_rate=0.1 seed=0",
        "learning_rate=0.1 seed=1",
    ]


def test_same_last_part_keeps_the_full_key_and_nothing_differing_falls_back() -> None:
    table = [{"a.rate": "1", "b.rate": "2"}, {"a.rate": "3", "b.rate": "2"}]
    assert legend_labels(table, ["p", "q"]) == ["a.rate=1", "a.rate=3"]
    table = [{"a.rate": "1", "b.rate": "2"}, {"a.rate": "3", "b.rate": "4"}]
    assert legend_labels(table, ["p", "q"]) == ["a.rate=1 b.rate=2", "a.rate=3 b.rate=4"]
    assert legend_labels([{"k": "1"}, {"k": "1"}], ["eamsgd p=4", "eamsgd p=4"]) == [
        "eamsgd p=4 #0",
        "eamsgd p=4 #1",
    ]
    assert legend_labels([{"k": "1"}], ["eamsgd p=4 tau=10"]) == ["eamsgd p=4 tau=10"]


def fake_run(
    root: Path, name: str, overrides: list[str], config: dict[str, Any], errors: list[float]
) -> Path:
    """A run folder as easgd.train leaves it: .hydra/overrides.yaml, summary.json, metrics.csv
    (one evaluation a second)."""
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    summary = {
        "algorithm": config["algorithm"]["name"],
        "workers": 4,
        "comm_period": 10,
        "seed": config["seed"],
        "test_error": errors[-1],
        "mode": "simulate",
        "config": config,
    }
    (run / "summary.json").write_text(json.dumps(summary))
    rows = ["wall_s,exchanges,server_updates,worker_steps,test_loss,test_error"]
    rows += [f"{float(t)},0,0,0,1.0,{e}" for t, e in enumerate(errors)]
    (run / "metrics.csv").write_text("\n".join(rows) + "\n")
    return run


def config_of(lr: float, seed: int) -> dict[str, Any]:
    return {"algorithm": {"name": "eamsgd", "learning_rate": lr}, "seed": seed, "run_dir": "x"}


def test_a_key_one_run_left_at_its_default_reads_the_config(tmp_path: Path) -> None:
    # run a overrides the learning rate as 0.050; run b keeps the default 0.05: they agree
    a = fake_run(
        tmp_path, "a", ["algorithm.learning_rate=0.050", "seed=1"], config_of(0.05, 1), [0.5]
    )
    b = fake_run(tmp_path, "b", [], config_of(0.05, 0), [0.5])
    table = settings([load_run(a), load_run(b)])
    assert table == [
        {"algorithm.learning_rate": "0.05", "seed": "1"},
        {"algorithm.learning_rate": "0.05", "seed": "0"},
    ]
    assert labels([a, b]) == ["seed=1", "seed=0"]
    lone = RunInfo(tmp_path, {}, {"algorithm": "easgd", "workers": 2, "comm_period": 4})
    assert settings([lone])[0]["comm.period"] == "4"  # no overrides: the summary's identity


def curve(lr: str, seed: str, errors: list[float]) -> RunCurve:
    """Evaluations one second apart, the last one final."""
    timed = tuple((float(t), e) for t, e in enumerate(errors))
    return RunCurve((("algorithm.learning_rate", lr),), seed, errors[-1], timed, "eamsgd")


def test_seeds_aggregate_into_one_row_with_mean_spread_best_and_time_to_target() -> None:
    curves = [
        curve("0.05", "0", [0.9, 0.30, 0.20, 0.25]),  # best 0.20; <= 0.3 first at 1 s
        curve("0.05", "1", [0.9, 0.50, 0.28, 0.15]),  # best 0.15; <= 0.3 first at 2 s
        curve("0.1", "0", [0.9, 0.60, 0.40]),  # never <= 0.3
    ]
    rows = aggregate(curves, target=0.3)
    assert rows == [
        {
            "algorithm": "eamsgd",
            "algorithm.learning_rate": "0.05",
            "runs": 2,
            "final_error_mean": pytest.approx((0.25 + 0.15) / 2),
            "final_error_min": 0.15,
            "final_error_max": 0.25,
            "best_error_mean": pytest.approx((0.20 + 0.15) / 2),
            "time_to_target_s": pytest.approx(1.5),
            "reached": "2/2",
        },
        {
            "algorithm": "eamsgd",
            "algorithm.learning_rate": "0.1",
            "runs": 1,
            "final_error_mean": 0.40,
            "final_error_min": 0.40,
            "final_error_max": 0.40,
            "best_error_mean": 0.40,
            "time_to_target_s": "not reached",
            "reached": "0/1",
        },
    ]
    assert default_target(curves) == 0.40  # the lowest error every run reached
    partial = aggregate(curves[:2], target=0.2)  # seed 0 at 2 s; seed 1 at 3 s
    assert (partial[0]["time_to_target_s"], partial[0]["reached"]) == (2.5, "2/2")
    partial = aggregate(curves[:2], target=0.16)  # only seed 1, at 3 s
    assert (partial[0]["time_to_target_s"], partial[0]["reached"]) == (3.0, "1/2")


def test_sweep_tables_from_run_folders(tmp_path: Path) -> None:
    for name, lr, seed, errors in [
        ("0_a", 0.05, 0, [0.9, 0.3, 0.2]),
        ("1_b", 0.05, 1, [0.9, 0.4, 0.1]),
        ("2_c", 0.1, 0, [0.9, 0.8, 0.6]),
        ("3_d", 0.1, 1, [0.9, 0.7, 0.5]),
    ]:
        overrides = [f"algorithm.learning_rate={lr}", f"seed={seed}", "progress=false"]
        fake_run(tmp_path, name, overrides, config_of(lr, seed), errors)
    write_tables(tmp_path, target_test_error=0.35)
    with open(tmp_path / "sweep_by_seed.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["algorithm.learning_rate"], r["runs"], r["reached"]) for r in rows] == [
        ("0.05", "2", "2/2"),
        ("0.1", "2", "0/2"),
    ]
    assert float(rows[0]["final_error_mean"]) == pytest.approx(0.15)
    assert float(rows[0]["time_to_target_s"]) == pytest.approx(1.5)  # seed 0 at 1 s, seed 1 at 2 s
    assert rows[1]["time_to_target_s"] == "not reached"
    with open(tmp_path / "sweep.csv") as handle:
        per_run = list(csv.DictReader(handle))
    assert [(r["run"], r["seed"], r["best_test_error"]) for r in per_run] == [
        ("0_a", "0", "0.2"),
        ("1_b", "1", "0.1"),
        ("2_c", "0", "0.6"),
        ("3_d", "1", "0.5"),
    ]
    md = (tmp_path / "sweep.md").read_text()
    assert "target test error 0.35" in md and "| eamsgd | 0.05 | 2 | 0.15 |" in md
    # the default target: the highest best error (0.6), which every run reached
    write_tables(tmp_path)
    assert "target test error 0.6;" in (tmp_path / "sweep.md").read_text()
