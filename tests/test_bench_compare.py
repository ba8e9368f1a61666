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
    # 1 GbE charges its line rate for the model's message (4 B a parameter + a 64 B header), in
    # steps of the measured step time: a closed form, not a comparison with the loopback
    # measurement, which a loaded machine can slow below 1 Gb/s
    charges = {(c["profile"], c["algorithm"]): c for c in task["charges"]}
    gigabit = charges[("ethernet_1g", "easgd")]
    message_s = (4 * task["num_params"] + 64) * 8 / 1e9
    assert gigabit["transfer"] == pytest.approx(message_s / gigabit["step_time_s"], rel=1e-9)
    assert gigabit["latency"] == pytest.approx(50e-6 / gigabit["step_time_s"], rel=1e-9)
    assert (tmp_path / "compare_quick.png").stat().st_size > 10_000
    # a second run finds every simulation in its cache
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "running" not in again.stdout


def test_compare_at_scale_quick_retunes_near_the_grid_and_charges_the_cluster_model(
    tmp_path: Path,
) -> None:
    """The protocol at scale in miniature: grid stage free, each (method, p)'s rate chosen among
    the grid winner's neighbours, and the cross-datacenter regime charging the 25M-parameter
    model's messages (not the 5k-parameter simulated one's)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EASGD_CACHE_DIR": str(tmp_path / "cache")}
    command = [sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--scale", "--quick",
               "--out", str(tmp_path)]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "compare_scale_quick.json").read_text())
    protocol = result["protocol"]
    assert protocol["grid_profile"] == "zero" and protocol["budget_steps"] == 24.0
    (task,) = result["tasks"]
    grid, speed = task["grid"], task["speedup"]
    runs = [
        json.loads(line)
        for line in (tmp_path / "compare_scale_cache_quick.jsonl").read_text().splitlines()
    ]
    assert {r["cost"]["name"] for r in runs if r["target"] is None} == {"zero"}  # tuned free
    # the rates the speed-up stage may try: the grid's middle 3 (quick), around the winner at
    # the grid tau nearest the speed-up tau (10 -> 4 of {1, 4}; 1 -> 1)
    for name, rates, speedup_tau, grid_tau in [
        ("easgd", protocol["plain_rates"], 10, 4), ("eamsgd", protocol["momentum_rates"], 10, 4),
        ("diloco", protocol["plain_rates"], 10, 4), ("downpour", protocol["plain_rates"], 1, 1),
        ("mdownpour", protocol["momentum_rates"], 1, 1),
    ]:  # fmt: skip
        kept = rates[len(rates) // 2 - 1 : len(rates) // 2 + 2]
        (row,) = [r for r in grid if r["algorithm"] == name and r["tau"] == grid_tau]
        at = kept.index(row["best_lr"])
        allowed = set(kept[max(0, at - 1) : at + 2])
        for workers in (4, 8):
            tried = [r for r in runs if r["name"] == name and r["workers"] == workers
                     and r["target"] is None and r["period"] == speedup_tau]  # fmt: skip
            # (at p = 4 and tau = 1 the grid stage's own runs are the same simulations)
            if speedup_tau == 1 and workers == 4:
                tried = [r for r in tried if r["lr"] in allowed]
            assert {r["lr"] for r in tried} == allowed
            best = min(tried, key=lambda r: min(e for e in r["errors"] if math.isfinite(e)))
            chosen = {r["lr"] for r in speed if r["algorithm"] == name and r["workers"] == workers}
            assert chosen == {best["lr"]}
    assert {r["profile"] for r in speed} == {"zero", "cross_datacenter"}
    # cross-datacenter: 1 Gb/s, 30 ms, 25,557,032 parameters (4 B each + a 64 B header) a message
    charges = {(c["profile"], c["algorithm"]): c for c in task["charges"]}
    cross = charges[("cross_datacenter", "easgd")]
    assert cross["transfer"] == pytest.approx((4 * 25_557_032 + 64) * 8 / 1e9 / 0.05, rel=1e-9)
    assert cross["latency"] == pytest.approx(0.030 / 0.05, rel=1e-9)
    assert charges[("zero", "easgd")]["transfer"] == 0.0
    # so a server worker's first round trip (2 x 16.96 steps) outlasts the 24-step budget: at
    # most one exchange per worker, where the free regime exchanges every tau steps
    for row in speed:
        if row["profile"] == "cross_datacenter" and row["algorithm"] in ("easgd", "downpour"):
            assert row["exchanges_mean"] <= row["workers"]
    free_downpour = [r for r in speed if r["profile"] == "zero" and r["algorithm"] == "downpour"]
    assert all(r["exchanges_mean"] > 2 * r["workers"] for r in free_downpour)
    assert (tmp_path / "compare_scale_quick.png").stat().st_size > 10_000
    # a run cut short: without p = 8's speed-up runs the report keeps p = 4 as it was and says
    # p = 8 is missing (each p is finished whole, cheapest first, so a deadline leaves this shape)
    cache = tmp_path / "compare_scale_cache_quick.jsonl"
    cache.write_text("".join(
        json.dumps(r) + "\n" for r in runs if r["target"] is None or r["workers"] != 8
    ))  # fmt: skip
    done = subprocess.run([*command, "--report-only"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    cut = json.loads((tmp_path / "compare_scale_quick.json").read_text())
    assert cut["incomplete"] == ["mnist1d (speed-up stage, p=8)"]
    assert cut["tasks"][0]["speedup"] == [r for r in speed if r["workers"] != 8]
    table = (tmp_path / "compare_scale_quick.md").read_text()
    map_rows = [line for line in table.splitlines() if line.startswith("| free")]
    (free,) = map_rows  # the who-is-first map: p=4 | p=8 | p=1
    cells = [cell.strip() for cell in free.split("|")[2:-1]]
    assert cells[1] == "not run yet" and "not run yet" not in (cells[0], cells[2])
