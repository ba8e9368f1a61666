"""Turn run or sweep directories into PNG curves: test error against wall-clock and against exchanges.

python -m easgd.plot runs/<id> runs/<other> --out compare.png
python -m easgd.plot multirun/2026-11-27_10-00-00          # every run of a sweep

Each curve's legend names what tells it apart from the others: the overrides whose values differ
between the plotted runs (``learning_rate=0.05 seed=1``; :mod:`easgd.compare`). A lone run, or
runs that differ in nothing, are labelled by their algorithm, workers and period.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import matplotlib

from easgd.compare import legend_labels, load_run, settings

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def find_runs(paths: list[Path]) -> list[Path]:
    """Run directories (holding metrics.csv) named directly or found one level below a sweep."""
    runs: list[Path] = []
    for path in paths:
        if (path / "metrics.csv").is_file():
            runs.append(path)
        else:
            runs.extend(sorted(p.parent for p in path.glob("*/metrics.csv")))
    runs = list({run.resolve(): run for run in runs}.values())  # a link (runs/latest) once
    if not runs:
        raise SystemExit(
            f"easgd.plot: no metrics.csv in {', '.join(map(str, paths))} or their subfolders"
        )
    return runs


def label(run: Path) -> str:
    """'eamsgd tau=10 p=4' from the run's summary (the folder name if there is none)."""
    summary_path = run / "summary.json"
    if not summary_path.is_file():
        return run.name
    summary = json.loads(summary_path.read_text())
    text = f"{summary['algorithm']} p={summary['workers']}"
    if summary.get("comm_period"):
        text += f" tau={summary['comm_period']}"
    if summary.get("latency_ms"):
        text += f" {summary['latency_ms']:g}ms"
    return text


def labels(runs: list[Path]) -> list[str]:
    """The legend of each run: the overrides that differ between ``runs`` (else :func:`label`)."""
    infos = [load_run(run) for run in runs]
    return legend_labels(settings(infos), [label(run) for run in runs])


def _mode(run: Path) -> str:
    """distributed, or simulate for runs of ``mode=simulate`` (their clock is virtual)."""
    path = run / "summary.json"
    return (
        json.loads(path.read_text()).get("mode", "distributed") if path.is_file() else "distributed"
    )


def read_metrics(run: Path) -> dict[str, list[float]]:
    """metrics.csv as columns of floats."""
    with open(run / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    return {key: [float(row[key]) for row in rows] for key in rows[0]} if rows else {}


def plot(
    runs: list[Path], out: Path, *, title: str = "Evaluated variable (center) on the test set"
) -> Path:
    """Two panels: test error (%) against wall-clock seconds and against exchanges."""
    fig, (by_time, by_exchanges) = plt.subplots(1, 2, figsize=(11, 4.2))
    for run, legend in zip(runs, labels(runs), strict=True):
        metrics = read_metrics(run)
        if not metrics:
            continue
        error = [100 * e for e in metrics["test_error"]]
        by_time.plot(metrics["wall_s"], error, label=legend)
        by_exchanges.plot(metrics["exchanges"], error, label=legend)
    simulated = [_mode(run) == "simulate" for run in runs]
    by_time.set_xlabel(
        "virtual time (s, cost model)"
        if all(simulated)
        else "time (s; simulated runs: virtual)"
        if any(simulated)
        else "wall-clock time (s)"
    )
    by_exchanges.set_xlabel("exchanges with the server")
    for axis in (by_time, by_exchanges):
        axis.set_ylabel("test error (%)")
        axis.set_yscale("log")
        axis.grid(True, which="both", alpha=0.3)
    by_time.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (``easgd-plot``)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("paths", nargs="+", type=Path, help="run directories or sweep directories")
    parser.add_argument(
        "--out", type=Path, default=None, help="PNG to write (default: <first path>/test_error.png)"
    )
    args = parser.parse_args(argv)
    runs = find_runs(args.paths)
    out = args.out or args.paths[0] / "test_error.png"
    print(f"wrote {plot(runs, out)} ({len(runs)} run(s))")


if __name__ == "__main__":
    main()
