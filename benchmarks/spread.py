"""Spread of minima (the talk, after Choromanska et al., AISTATS 2015): does the spread of the
losses reached from many random initialisations narrow, and the losses drop, as the network grows?

The sweep is configs/experiment/spread.yaml (one-hidden-layer MLPs on MNIST-1D, plain SGD, width x
seed from its ``hydra.sweeper.params``). This script runs exactly that configuration in-process,
one run per (width, seed) through the same sequential runner ``python -m easgd.train`` uses,
cached and resumable; or it reads the summary.json files of a Hydra sweep you ran yourself.

    python benchmarks/spread.py --quick                       # 2 widths x 3 seeds, < 20 s, CI
    python benchmarks/spread.py --jobs 2 --max-minutes 9      # full: 4 widths x 30 seeds
    python -m easgd.train -m experiment=spread                # the same as a Hydra sweep
    python benchmarks/spread.py --from-sweep multirun/<date>  # figures of that sweep
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from _claims import Task, claims_parser, deadline_of, run_cached, write_results  # noqa: E402
from _common import suffix  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.override_parser.overrides_parser import OverridesParser  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from easgd.config.schema import validate  # noqa: E402
from easgd.config.store import register  # noqa: E402
from easgd.topologies.sequential import run_sequential  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EXPERIMENT = CONFIGS / "experiment" / "spread.yaml"
QUICK_OVERRIDES = ("steps_per_worker=150",)
QUICK_WIDTHS, QUICK_SEEDS = (4, 16), (0, 1, 2)
FIGURES = ("train_loss", "test_loss", "train_error", "test_error")


def sweep_grid() -> tuple[list[int], list[int]]:
    """The widths and seeds of spread.yaml's ``hydra.sweeper.params`` (Hydra's own parser)."""
    params = OmegaConf.load(EXPERIMENT).hydra.sweeper.params
    parse = OverridesParser.create().parse_overrides
    widths = [
        list(v)[0] for v in parse([f"model.hidden={params['model.hidden']}"])[0].sweep_iterator()
    ]
    seeds = list(parse([f"seed={params['seed']}"])[0].sweep_iterator())
    return [int(w) for w in widths], [int(s) for s in seeds]


def run_one(*, width: int, seed: int, overrides: list[str]) -> dict[str, Any]:
    """One run of the spread experiment, composed by Hydra exactly as the sweep composes it."""
    register()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        composed = compose(
            config_name="config",
            overrides=["experiment=spread", f"model.hidden=[{width}]", f"seed={seed}", *overrides],
        )
    cfg = validate(composed)
    with tempfile.TemporaryDirectory() as run_dir:
        cfg.run_dir = run_dir
        summary = run_sequential(cfg)
    return {"width": width, "seed": seed, **figures_of(summary)}


def figures_of(summary: dict[str, Any]) -> dict[str, float]:
    """Train and test figures of a sequential run's summary.json (train ones under details)."""
    merged = {**summary, **summary.get("details", {})}
    if "train_loss" not in merged:
        raise ValueError("the summary has no train_loss (not a sequential run, or an older easgd)")
    return {k: merged[k] for k in FIGURES}


def from_sweep(root: Path) -> list[dict[str, Any]]:
    """One row per summary.json of a ``python -m easgd.train -m experiment=spread`` sweep."""
    rows = []
    for path in sorted(root.glob("*/summary.json")):
        summary = json.loads(path.read_text())
        width = summary["config"]["model"]["hidden"][0]
        rows.append({"width": width, "seed": summary["seed"], **figures_of(summary)})
    if not rows:
        raise ValueError(f"no */summary.json under {root}: pass the sweep's root directory")
    return rows


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per width: mean, standard deviation, min, max of each final figure."""
    rows = []
    for width in sorted({r["width"] for r in runs}):
        mine = [r for r in runs if r["width"] == width]
        row: dict[str, Any] = {"width": width, "runs": len(mine)}
        for key in FIGURES:
            values = [r[key] for r in mine]
            row[f"{key}_mean"] = statistics.fmean(values)
            row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            row[f"{key}_min"], row[f"{key}_max"] = min(values), max(values)
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    head = (
        "| width | runs | train loss mean | train loss std | test loss mean | test loss std "
        "| test loss range | train err % | test err % |\n" + "|---" * 9 + "|\n"
    )
    lines = [
        f"| {r['width']} | {r['runs']} | {r['train_loss_mean']:.4f} | {r['train_loss_std']:.4f} "
        f"| {r['test_loss_mean']:.4f} | {r['test_loss_std']:.4f} "
        f"| {r['test_loss_min']:.3f}-{r['test_loss_max']:.3f} "
        f"| {100 * r['train_error_mean']:.1f} +- {100 * r['train_error_std']:.1f} "
        f"| {100 * r['test_error_mean']:.1f} +- {100 * r['test_error_std']:.1f} |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


def plot(runs: list[dict[str, Any]]) -> Figure:
    widths = sorted({r["width"] for r in runs})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    for ax, key in zip(axes, ("train_loss", "test_loss"), strict=True):
        values = [r[key] for r in runs]
        bins = np.linspace(min(values), max(values), 40)
        for k, width in enumerate(widths):
            mine = [r[key] for r in runs if r["width"] == width]
            ax.hist(
                mine, bins=bins, alpha=0.55, color=f"C{k}", label=f"width {width} (n={len(mine)})"
            )
        ax.set(xlabel=f"final {key.replace('_', ' ')}", ylabel="runs (seeds)")
        ax.set_title(f"final {key.replace('_', ' ')} over random initialisations")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    p = claims_parser(__doc__ or "")
    p.add_argument("--from-sweep", type=Path, default=None, help="a Hydra sweep's root directory")
    args = p.parse_args(argv)
    tag = "spread" + suffix(args.quick)
    if args.from_sweep is not None:
        runs = from_sweep(args.from_sweep)
        tag = "spread_sweep"
    else:
        widths, seeds = (QUICK_WIDTHS, QUICK_SEEDS) if args.quick else sweep_grid()
        overrides = list(QUICK_OVERRIDES) if args.quick else []
        todo: list[Task] = [
            (f"w{w}_s{s}", {"width": w, "seed": s, "overrides": overrides})
            for w in widths
            for s in seeds
        ]
        done, complete = run_cached(
            run_one, todo, cache=args.out / f"{tag}_runs.jsonl", jobs=args.jobs,
            deadline=deadline_of(args.max_minutes),
        )  # fmt: skip
        if not complete:
            return 3
        runs = [done[key] for key, _ in todo]
    rows = summarize(runs)
    write_results(
        args.out,
        tag,
        table=markdown(rows),
        rows=rows,
        summary={"summary": rows, "runs": runs},
        figure=plot(runs),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
