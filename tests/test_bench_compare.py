"""benchmarks/compare.py runs the paper's protocol in miniature and reports every method alike."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_compare_quick_runs_the_protocol_uniformly_and_resumes_from_its_cache(
    tmp_path: Path,
) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EASGD_CACHE_DIR": str(tmp_path / "cache")}
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "compare.py"),
        "--quick",
        "--out",
        str(tmp_path),
    ]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "compare_quick.json").read_text())
    (task,) = result["tasks"]
    grid = task["grid"]
    # every method: the same number of grid values at every tau it runs, the best one chosen
    assert {len(r["grid_seed0"]) for r in grid} == {2}
    for row in grid:
        best = min(row["grid_seed0"].values())
        assert row["grid_seed0"][str(row["best_lr"])] == best
        assert len(row["best_test_error_seeds"]) == 2
    taus = {(r["algorithm"], r["tau"]) for r in grid}
    assert {("easgd", 1), ("easgd", 4), ("downpour", 4), ("mdownpour", 1), ("msgd", 1)} <= taus
    # the threshold: 1.1 x the better sequential baseline's best error, rounded up to a percent
    best = min(r["best_test_error_mean"] for r in grid if r["algorithm"] in ("sgd", "msgd"))
    assert task["threshold"] == math.ceil(100 * 1.1 * best - 1e-9) / 100
    worst = max(r["best_test_error_mean"] for r in grid if r["algorithm"] in ("sgd", "msgd"))
    assert task["loose_threshold"] == math.ceil(100 * worst - 1e-9) / 100
    speed = task["speedup"]
    assert {(r["profile"], r["algorithm"], r["workers"]) for r in speed} == {
        (profile, name, p)
        for profile in ("measured", "ethernet_1g")
        for name, counts in [("easgd", (4, 8)), ("eamsgd", (4, 8)), ("downpour", (4, 8)),
                             ("mdownpour", (4, 8)), ("localsgd", (4, 8)), ("diloco", (4, 8)),
                             ("sgd", (1,)), ("msgd", (1,))]
        for p in counts
    }  # fmt: skip
    assert {r["tau"] for r in speed if r["algorithm"] in ("easgd", "eamsgd")} == {10}
    assert {r["tau"] for r in speed if r["algorithm"] in ("localsgd", "diloco")} == {10}
    assert {("localsgd", 1), ("localsgd", 4), ("diloco", 1), ("diloco", 4)} <= taus
    for row in speed:  # a time is reported only when at least half of the seeds got there
        for key, seeds in (
            ("time_to_threshold", "seeds_reached"),
            ("time_to_loose", "seeds_reached_loose"),
        ):
            reached, total = map(int, row[seeds].split("/"))
            assert (row[key] is not None) == (2 * reached > total)
    # 1 GbE charges more per exchange than loopback for the same model
    charges = {(c["profile"], c["algorithm"]): c for c in task["charges"]}
    assert (
        charges[("ethernet_1g", "easgd")]["transfer"] > charges[("measured", "easgd")]["transfer"]
    )
    assert (tmp_path / "compare_quick.png").stat().st_size > 10_000
    # a second run finds every simulation in its cache
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "running" not in again.stdout
