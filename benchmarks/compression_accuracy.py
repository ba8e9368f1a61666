"""What compressed exchanges cost in accuracy: a quick form of issue 19's item 4, in mode=simulate.

MNIST-1D with its 1-D CNN (``experiment=mnist1d``: EAMSGD, p = 4, tau = 10), 1 Gb Ethernet
charges with a fixed step time (2 ms) and service time (200 us), so nothing is measured and the
runs are deterministic; every format with error feedback, int8 also without, 3 seeds, a fixed
step budget per worker. One run per process, each under the shared CPU lock::

    python benchmarks/compression_accuracy.py --steps 1000   # writes results/compression_accuracy.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SETTINGS = [("none", True), ("bf16", True), ("fp16", True), ("int8", True), ("int8", False)]
LOCK = "/tmp/easgd-cpu.lock"


def run(compression: str, error_feedback: bool, seed: int, steps: int, scratch: str) -> dict:
    """One simulated run; its summary's final figures."""
    run_dir = Path(scratch) / f"{compression}_{error_feedback}_{seed}"
    command = [
        "flock", LOCK, sys.executable, "-m", "easgd.train", "mode=simulate",
        "experiment=mnist1d", "cost=ethernet_1g", "cost.step_time_s=0.002",
        "cost.service_us=200", f"comm.compression={compression}",
        f"comm.error_feedback={str(error_feedback).lower()}", f"seed={seed}",
        f"steps_per_worker={steps}", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, env=os.environ.copy())
    summary = json.loads((run_dir / "summary.json").read_text())
    return {key: summary[key] for key in ("test_error", "test_loss", "wall_time_s")}


def main() -> None:
    """Run every setting and seed; write one CSV row per run and print the means."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/compression_accuracy.csv")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for compression, error_feedback in SETTINGS:
            for seed in range(args.seeds):
                figures = run(compression, error_feedback, seed, args.steps, scratch)
                rows.append({"compression": compression, "error_feedback": error_feedback,
                             "seed": seed, "steps_per_worker": args.steps, **figures})  # fmt: skip
                print(rows[-1], flush=True)
    with open(args.out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for compression, error_feedback in SETTINGS:
        errors = [r["test_error"] for r in rows
                  if (r["compression"], r["error_feedback"]) == (compression, error_feedback)]  # fmt: skip
        spread = statistics.stdev(errors) if len(errors) > 1 else 0.0
        print(f"{compression:5s} ef={error_feedback!s:5s} test error "
              f"{statistics.mean(errors):.4f} +- {spread:.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
