"""After a Hydra sweep (``-m``), gather every run's summary.json into one table at the sweep root."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

COLUMNS = (
    "run",
    "algorithm",
    "workers",
    "comm_period",
    "learning_rate",
    "momentum",
    "latency_ms",
    "steps_per_worker",
    "exchanges",
    "wall_time_s",
    "test_error",
    "test_loss",
    "stop_reason",
    "mode",
)


def collect(root: Path) -> list[dict[str, Any]]:
    """One row per ``summary.json`` below ``root`` (sorted by run directory)."""
    rows = []
    for path in sorted(root.glob("*/summary.json")):
        summary = json.loads(path.read_text())
        row = {"run": path.parent.name, **{k: summary.get(k) for k in COLUMNS[1:]}}
        row["mode"] = summary.get("mode", "distributed")  # wall_time_s is virtual in simulate
        rows.append(row)
    return rows


def write_tables(root: Path) -> tuple[Path, Path] | None:
    """Write ``sweep.csv`` and ``sweep.md`` under ``root``; None when no run finished."""
    rows = collect(root)
    if not rows:
        return None
    csv_path, md_path = root / "sweep.csv", root / "sweep.md"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [_fmt(row[c]) for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


class SweepTable(Callback):
    """Hydra callback: on the end of a multirun, write the summary table."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        root = Path(config.hydra.sweep.dir)
        written = write_tables(root)
        if written:
            print(f"sweep table: {written[0]} and {written[1]}")
            print(written[1].read_text())
