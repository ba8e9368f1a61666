"""After a Hydra sweep (``-m``), gather every run into tables at the sweep root.

- ``sweep.csv``: one row per run (its summary's figures, its best test error and its time to the
  target error);
- ``sweep_by_seed.csv`` and ``sweep.md`` (printed at the end of the sweep): runs that differ only
  in ``seed`` form one row: the settings that differ between rows, how many runs, the final test
  error's mean, min and max over the seeds (the spread is min-max: with 2-5 seeds a standard
  deviation says little), the mean of each run's best test error, and the mean time to the
  target error over the runs that reached it (``reached`` says how many did; "not reached" when
  none did).

The target error: ``hydra.callbacks.sweep_table.target_test_error`` if set, else the runs'
``target_test_error`` (their stop rule) if they share one, else the highest best error among the
runs (the lowest error every run reached, so every row has a time). Times are read from
metrics.csv at the first evaluation at or below the target: wall-clock seconds, virtual seconds
for ``mode=simulate``. Rebuild the tables with another target::

    python -m easgd.sweep multirun/2026-11-27_10-00-00 --target 0.05
"""

from __future__ import annotations

import argparse
import csv
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from easgd.compare import RunInfo, differing_keys, load_run, settings

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
RUN_COLUMNS = (*COLUMNS, "seed", "best_test_error", "time_to_target_s")
FIGURES: tuple[str, ...] = ("runs", "final_error_mean", "final_error_min", "final_error_max")
FIGURES += ("best_error_mean", "time_to_target_s", "reached")


@dataclass(frozen=True)
class RunCurve:
    """One finished run: its settings but the seed, its seed, final error and evaluations."""

    setting: tuple[tuple[str, str], ...]
    seed: str
    final_error: float
    evaluations: tuple[tuple[float, float], ...]
    """(seconds, test error) of every evaluation, in order."""
    algorithm: str = ""

    @property
    def best_error(self) -> float:
        """The lowest test error of any evaluation (the final one if none was recorded)."""
        return min((error for _, error in self.evaluations), default=self.final_error)

    def time_to(self, target: float) -> float | None:
        """Seconds at the first evaluation at or below ``target`` (None: never reached)."""
        return next((s for s, error in self.evaluations if error <= target), None)


def default_target(curves: Sequence[RunCurve]) -> float:
    """The highest best error among ``curves``: the lowest error that every run reached."""
    return max(curve.best_error for curve in curves)


def aggregate(curves: Sequence[RunCurve], target: float) -> list[dict[str, Any]]:
    """One row per setting (runs that differ only in seed), in first-seen order: the setting's
    keys, ``algorithm``, then :data:`FIGURES` (min-max spread of the final error; the mean time to ``target``
    over the runs that reached it)."""
    groups: dict[tuple[tuple[str, str], ...], list[RunCurve]] = {}
    for curve in curves:
        groups.setdefault(curve.setting, []).append(curve)
    rows = []
    for setting, runs in groups.items():
        finals = [run.final_error for run in runs]
        times = [t for t in (run.time_to(target) for run in runs) if t is not None]
        rows.append(
            {
                "algorithm": ",".join(sorted({run.algorithm for run in runs})),
                **dict(setting),
                "runs": len(runs),
                "final_error_mean": statistics.fmean(finals),
                "final_error_min": min(finals),
                "final_error_max": max(finals),
                "best_error_mean": statistics.fmean(run.best_error for run in runs),
                "time_to_target_s": statistics.fmean(times) if times else "not reached",
                "reached": f"{len(times)}/{len(runs)}",
            }
        )
    return rows


def read_curve(run: RunInfo, setting: dict[str, str]) -> RunCurve:
    """``run``'s curve from its metrics.csv (``setting``: its compared keys, seed included)."""
    assert run.summary is not None
    evaluations: list[tuple[float, float]] = []
    metrics = run.path / "metrics.csv"
    if metrics.is_file():
        with open(metrics) as handle:
            evaluations = [
                (float(r["wall_s"]), float(r["test_error"])) for r in csv.DictReader(handle)
            ]
    seed = setting.get("seed", str(run.summary.get("seed")))
    others = tuple((k, v) for k, v in setting.items() if k != "seed")
    final = float(run.summary["test_error"])
    return RunCurve(others, seed, final, tuple(evaluations), str(run.summary.get("algorithm")))


def collect(root: Path) -> tuple[list[RunInfo], list[RunCurve]]:
    """Every finished run below ``root`` (sorted by folder) and its curve."""
    runs = [load_run(path.parent) for path in sorted(root.glob("*/summary.json"))]
    return runs, [read_curve(run, row) for run, row in zip(runs, settings(runs), strict=True)]


def choose_target(
    runs: Sequence[RunInfo], curves: Sequence[RunCurve], given: float | None
) -> float:
    """The target error (see the module docstring for the order of choice)."""
    if given is not None:
        return given
    stop_rules = {
        ((run.summary or {}).get("config") or {}).get("target_test_error") for run in runs
    }
    shared = stop_rules.pop() if len(stop_rules) == 1 else None
    if shared is not None:
        return float(shared)
    return default_target(curves)


def write_tables(root: Path, target_test_error: float | None = None) -> tuple[Path, Path] | None:
    """Write ``sweep.csv``, ``sweep_by_seed.csv`` and ``sweep.md`` under ``root``; returns the
    first and the last (None when no run finished)."""
    runs, curves = collect(root)
    if not runs:
        return None
    target = choose_target(runs, curves, target_test_error)
    per_run = [_run_row(run, curve, target) for run, curve in zip(runs, curves, strict=True)]
    csv_path = _write_csv(root / "sweep.csv", RUN_COLUMNS, per_run)
    rows = aggregate(curves, target)
    keys = differing_keys([{k: row[k] for k in row if k not in FIGURES} for row in rows])
    columns = ("algorithm",) * ("algorithm" not in keys) + tuple(keys) + FIGURES
    _write_csv(root / "sweep_by_seed.csv", columns, rows)
    clock = "virtual s (mode=simulate)" if curves and _simulated(runs) else "s"
    lines = [
        f"Runs that differ only in seed, one row each; target test error {target:.4g}; times in "
        f"{clock}; spread: min and max over the seeds.",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for row in rows]
    md_path = root / "sweep.md"
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def _run_row(run: RunInfo, curve: RunCurve, target: float) -> dict[str, Any]:
    summary = run.summary or {}
    row = {"run": run.path.name, **{k: summary.get(k) for k in COLUMNS[1:]}, "seed": curve.seed}
    row["mode"] = summary.get("mode", "distributed")  # wall_time_s is virtual in simulate
    reached = curve.time_to(target)
    row["best_test_error"] = curve.best_error
    row["time_to_target_s"] = "not reached" if reached is None else reached
    return row


def _simulated(runs: Sequence[RunInfo]) -> bool:
    return all((run.summary or {}).get("mode") == "simulate" for run in runs)


def _write_csv(path: Path, columns: Sequence[str], rows: list[dict[str, Any]]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


class SweepTable(Callback):
    """Hydra callback: on the end of a multirun, write the tables (``target_test_error``: the
    target of the time-to-target column; None: chosen as the module docstring says)."""

    def __init__(self, target_test_error: float | None = None) -> None:
        self.target_test_error = target_test_error

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        root = Path(config.hydra.sweep.dir)
        written = write_tables(root, self.target_test_error)
        if written:
            print(f"sweep tables: {written[0]}, {root / 'sweep_by_seed.csv'} and {written[1]}")
            print(written[1].read_text())


def main(argv: list[str] | None = None) -> None:
    """Rebuild a sweep's tables (``python -m easgd.sweep DIR [--target ERROR]``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="the sweep directory (hydra.sweep.dir)")
    parser.add_argument("--target", type=float, default=None, help="target test error (0-1)")
    args = parser.parse_args(argv)
    written = write_tables(args.root, args.target)
    if written is None:
        raise SystemExit(f"easgd.sweep: no summary.json in the subfolders of {args.root}")
    print(written[1].read_text())


if __name__ == "__main__":
    main()
