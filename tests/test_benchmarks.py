"""Every benchmark script runs in its quick mode and writes the figures it promises."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def run_quick(script: str, out: Path, *extra: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out", str(out), *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_stability_quick(tmp_path: Path) -> None:
    run_quick("stability.py", tmp_path)
    with open(tmp_path / "stability_quick.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["method", "p", "lr", "moving_rate_or_rho", "spectral_radius", "stable"]
    assert {r["method"] for r in rows} == {"easgd", "admm"}
    summary = json.loads((tmp_path / "stability_quick.json").read_text())
    assert summary["agreement_with_analytic"]["easgd_p1"] == 1.0
    assert summary["paper_example_eta0.001_rho2.5"]["p3"]["admm_radius"] > 1.0
    assert (tmp_path / "stability_quick.png").stat().st_size > 10_000
