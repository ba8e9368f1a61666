"""Shared by the benchmark scripts: command-line flags, machine description, result files."""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def parser(description: str) -> argparse.ArgumentParser:
    """--quick (under a minute, run in CI) and --out (default benchmarks/results)."""
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick", action="store_true", help="small version (under a minute; CI runs it)"
    )
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for CSV/JSON/PNG results")
    return p


def one_thread_cli(description: str) -> argparse.Namespace:
    """The flags of :func:`parser` plus ``--device`` (cpu, or cuda for the GPU variant), parsed;
    torch and OpenMP set to one thread, as every step-rate benchmark measures."""
    cli = parser(description)
    cli.add_argument("--device", default="cpu", help="cpu, or cuda for the GPU variant")
    args = cli.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return args


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def write_json(path: Path, data: Any) -> None:
    """JSON with the machine description under 'machine'."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(), **data}, indent=2, default=str) + "\n")


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rows as CSV (columns from the first row)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def suffix(quick: bool) -> str:
    """Quick results never overwrite full ones."""
    return "_quick" if quick else ""
