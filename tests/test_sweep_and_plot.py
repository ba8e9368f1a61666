"""A Hydra sweep of real distributed runs produces its table; the plot command draws them."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from easgd.plot import find_runs, label, main

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_sweep_of_real_distributed_runs_writes_table_and_plot(tmp_path: Path) -> None:
    # two real runs (an elastic and a push/pull server); the table's grid mechanics over two
    # swept keys are proven at 2 x 2 in simulate mode (test_simulate_mode.py)
    sweep = tmp_path / "sweep"
    args = [
        sys.executable, "-m", "easgd.train", "-m",
        "algorithm=eamsgd,downpour", "comm.period=4",
        "workers=2", "steps_per_worker=80", "eval_interval_s=0.2", "progress=false",
        f"hydra.sweep.dir={sweep}",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(sweep / "sweep.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted((r["algorithm"], r["comm_period"]) for r in rows) == [
        ("downpour", "4"), ("eamsgd", "4"),
    ]  # fmt: skip
    for row in rows:
        assert row["mode"] == "distributed"
        assert int(row["exchanges"]) == 2 * 80 // 4  # 2 workers, an exchange every 4 steps
        summary = json.loads((sweep / row["run"] / "summary.json").read_text())
        assert summary["workers"] == 2
    assert "| eamsgd |" in (sweep / "sweep.md").read_text()

    out = tmp_path / "curves.png"
    main([str(sweep), "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = find_runs([sweep])
    assert len(runs) == 2 and {label(r).split()[0] for r in runs} == {"eamsgd", "downpour"}


def test_plot_names_a_folder_without_runs(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no metrics.csv"):
        main([str(tmp_path)])
