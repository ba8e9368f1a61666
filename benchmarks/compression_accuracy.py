"""What compressed exchanges cost in accuracy (issue 19, item 4): every format with and without
error feedback, 3 seeds, on two tasks.

* ``--task comparison`` (default): the MNIST-1D comparison setting in mode=simulate, MNIST-1D with
  its 1-D CNN (``experiment=mnist1d``: EAMSGD, p = 4, tau = 10), 1 Gb Ethernet charges with a fixed
  step time (2 ms) and service time (200 us), so nothing is measured and the runs are
  deterministic; a fixed step budget per worker.
* ``--task main``: the main job for real (``python -m easgd.train``: 4 EAMSGD workers and the
  parameter server as processes over gloo, digits MLP, 3,000 steps per worker); the asynchronous
  order varies from run to run, so the seeds' spread includes it.

One run per process, each under the shared CPU lock::

    python benchmarks/compression_accuracy.py --steps 800      # results/compression_accuracy.csv
    python benchmarks/compression_accuracy.py --task main      # results/compression_accuracy_main.csv
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

SETTINGS = [("none", True), ("bf16", True), ("bf16", False), ("fp16", True), ("fp16", False),
            ("int8", True), ("int8", False)]  # fmt: skip
"""(format, error feedback); float32 has nothing to feed back."""
LOCK = "/tmp/easgd-cpu.lock"


TASKS = {
    "comparison": ["mode=simulate", "experiment=mnist1d", "cost=ethernet_1g",
                   "cost.step_time_s=0.002", "cost.service_us=200"],
    "main": ["progress=false"],
}  # fmt: skip
"""The Hydra overrides of each task (``main``: the defaults, i.e. the README's main job)."""


def run(
    task: str, compression: str, error_feedback: bool, seed: int, steps: int | None, scratch: str
) -> dict:
    """One run; its summary's final figures."""
    run_dir = Path(scratch) / f"{compression}_{error_feedback}_{seed}"
    command = [
        "flock", LOCK, sys.executable, "-m", "easgd.train", *TASKS[task],
        f"comm.compression={compression}", f"comm.error_feedback={str(error_feedback).lower()}",
        f"seed={seed}", f"hydra.run.dir={run_dir}",
        *([] if steps is None else [f"steps_per_worker={steps}"]),
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, env=os.environ.copy())
    summary = json.loads((run_dir / "summary.json").read_text())
    return {key: summary[key] for key in ("test_error", "test_loss", "wall_time_s")}


def main() -> None:
    """Run every setting and seed; write one CSV row per run and print the means."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="comparison")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps per worker (default: 1000 for comparison, the job's own for main)")  # fmt: skip
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default=None, help="CSV (default benchmarks/results/...)")
    args = parser.parse_args()
    steps = 1000 if args.steps is None and args.task == "comparison" else args.steps
    tag = "" if args.task == "comparison" else f"_{args.task}"
    out = args.out or f"benchmarks/results/compression_accuracy{tag}.csv"
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for compression, error_feedback in SETTINGS:
            for seed in range(args.seeds):
                figures = run(args.task, compression, error_feedback, seed, steps, scratch)
                rows.append({"compression": compression, "error_feedback": error_feedback,
                             "seed": seed, "steps_per_worker": steps or "default", **figures})  # fmt: skip
                print(rows[-1], flush=True)
    with open(out, "w", newline="") as handle:
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
