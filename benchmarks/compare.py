"""The paper's comparison, scaled to this machine: EAMSGD and EASGD (tau = 10), DOWNPOUR and
MDOWNPOUR (tau = 1) with p = 4 workers, MSGD and SGD with p = 1; then a tau sweep in {1, 4, 16, 64}
for EASGD, EAMSGD and DOWNPOUR. A small learning-rate grid and several seeds per setting; the best
setting (lowest mean final test error) is reported, as the paper did.

Two clocks, side by side:
- simulator, virtual time: one time unit = one step of one worker, workers in parallel. This is the
  paper's setting (one GPU per worker): p = 4 methods take 4 steps per unit, p = 1 methods one.
- real runtime, wall-clock: the same methods as real processes under the elastic launcher, all with
  the same wall-clock budget. On this 2-core machine the p = 4 workers share the CPU, so wall-clock
  favours p = 1 here; per-worker steps are reported next to it.

    python benchmarks/compare.py            # full (about 8 minutes on 2 cores)
    python benchmarks/compare.py --quick    # digits only, one seed, default learning rates (< 1 min)
"""

from __future__ import annotations

import csv
import multiprocessing as mp
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import parser, suffix, write_csv, write_json  # noqa: E402

from easgd.config.algorithm import AlgorithmConfig  # noqa: E402
from easgd.config.schema import CommConfig, DataConfig, TrainConfig  # noqa: E402
from easgd.data.digits import load_digits_split  # noqa: E402
from easgd.data.synthetic import make_teacher_student  # noqa: E402
from easgd.models import MLP  # noqa: E402
from easgd.runtime.launcher import launch  # noqa: E402
from easgd.sim import ClassifierObjective, SimConfig, simulate  # noqa: E402

TARGETS = {"digits": 0.05, "synthetic": 0.25}


@dataclass(frozen=True)
class Method:
    """One contender: algorithm, workers, period, momentum and its learning-rate grid."""

    label: str
    name: str
    workers: int
    period: int
    momentum: float
    rates: tuple[float, ...]

    def config(self, rate: float) -> AlgorithmConfig:
        return AlgorithmConfig(self.name, learning_rate=rate, momentum=self.momentum)


METHODS = (
    Method("EAMSGD tau=10", "eamsgd", 4, 10, 0.99, (0.005, 0.01, 0.02)),
    Method("EASGD tau=10", "easgd", 4, 10, 0.0, (0.05, 0.1, 0.2)),
    Method("DOWNPOUR tau=1", "downpour", 4, 1, 0.0, (0.02, 0.05, 0.1)),
    Method("MDOWNPOUR tau=1", "mdownpour", 4, 1, 0.99, (0.001, 0.002, 0.005)),
    Method("MSGD p=1", "msgd", 1, 1, 0.99, (0.002, 0.005, 0.01)),
    Method("SGD p=1", "sgd", 1, 1, 0.0, (0.05, 0.1, 0.2)),
)
SWEPT = ("eamsgd", "easgd", "downpour")
PERIODS = (1, 4, 16, 64)


def split_for(dataset: str):  # type: ignore[no-untyped-def]
    return load_digits_split() if dataset == "digits" else make_teacher_student()


def sim_job(job: tuple[str, Method, int, float, int, float]) -> dict[str, Any]:
    """One simulated run; returns its curve."""
    dataset, method, period, rate, seed, duration = job
    torch.set_num_threads(1)
    split = split_for(dataset)
    torch.manual_seed(seed)
    objective = ClassifierObjective(MLP(split.input_shape, split.num_classes, (128,)), split)
    sim = SimConfig(
        num_workers=method.workers,
        comm_period=period,
        duration=duration,
        eval_interval=duration / 20,
        seed=seed,
    )
    result = simulate(method.config(rate), sim, objective)
    return {
        "dataset": dataset, "label": method.label, "name": method.name, "period": period, "rate": rate, "seed": seed,
        "times": [p.time for p in result.history], "errors": [p.test_error for p in result.history],
        "steps_per_worker": result.steps // method.workers,
    }  # fmt: skip


def best_settings(runs: list[dict[str, Any]], target: float) -> list[dict[str, Any]]:
    """Per (dataset, method, period): the rate with the lowest mean final error, and its figures."""
    groups: dict[tuple, dict[float, list[dict[str, Any]]]] = {}
    for run in runs:
        groups.setdefault(
            (run["dataset"], run["label"], run["name"], run["period"]), {}
        ).setdefault(run["rate"], []).append(run)
    rows = []
    for (dataset, label, name, period), by_rate in groups.items():

        def final(r: float, by_rate: dict[float, list[dict[str, Any]]] = by_rate) -> float:
            errors = [run["errors"][-1] for run in by_rate[r]]
            return float(np.mean(errors)) if all(np.isfinite(errors)) else float("inf")

        rate = min(by_rate, key=final)
        curves = np.array([run["errors"] for run in by_rate[rate]])
        mean = np.nan_to_num(curves.mean(0), nan=1.0)
        times = by_rate[rate][0]["times"]
        hit = next((t for t, e in zip(times, mean, strict=True) if e <= target), None)
        rows.append({
            "dataset": dataset, "method": label, "algorithm": name, "tau": period, "best_lr": rate,
            "seeds": len(by_rate[rate]), "final_test_error": float(mean[-1]), "best_test_error": float(mean.min()),
            "time_to_target": hit, "target": target, "diverged_rates": sum(final(r) == float("inf") or final(r) > 0.8 for r in by_rate),
            "steps_per_worker": by_rate[rate][0]["steps_per_worker"], "_times": times, "_curve": mean.tolist(),
        })  # fmt: skip
    return rows


def runtime_run(
    method: Method, rate: float, seed: int, budget_s: float, root: Path
) -> dict[str, Any]:
    """One real distributed run with a wall-clock budget; returns its summary and curve."""
    run_dir = root / f"{method.name}-{seed}"
    cfg = TrainConfig(
        algorithm=method.config(rate), data=DataConfig(name="digits"), workers=method.workers,
        steps_per_worker=10**9, max_wall_s=budget_s, eval_interval_s=budget_s / 20, seed=seed,
        progress=False, tensorboard=False, run_dir=str(run_dir), comm=CommConfig(period=method.period),
    )  # fmt: skip
    summary = launch(cfg)
    assert summary is not None
    with open(run_dir / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    return {
        "summary": summary,
        "times": [float(r["wall_s"]) for r in rows], "errors": [float(r["test_error"]) for r in rows],
    }  # fmt: skip


def main() -> None:
    args = parser(__doc__ or "").parse_args()
    quick = args.quick
    datasets = ("digits",) if quick else ("digits", "synthetic")
    seeds = (0,) if quick else (0, 1, 2)
    duration = 300.0 if quick else 500.0

    def rates(method: Method) -> tuple[float, ...]:
        return (method.rates[1],) if quick else method.rates

    jobs = [
        (d, m, m.period, r, s, duration)
        for d in datasets
        for m in METHODS
        for r in rates(m)
        for s in seeds
    ]
    by_name = {m.name: m for m in METHODS}
    sweep_jobs = [
        (d, by_name[name], tau, r, s, duration)
        for d in datasets for name in SWEPT for tau in PERIODS for r in rates(by_name[name]) for s in seeds
    ]  # fmt: skip
    with mp.get_context("spawn").Pool(2) as pool:
        runs = pool.map(sim_job, jobs)
        sweep_runs = pool.map(sim_job, sweep_jobs)
    sim_rows = [
        r
        for d in datasets
        for r in best_settings([x for x in runs if x["dataset"] == d], TARGETS[d])
    ]
    sweep_rows = [
        r
        for d in datasets
        for r in best_settings([x for x in sweep_runs if x["dataset"] == d], TARGETS[d])
    ]

    # real runtime, wall-clock, digits, the simulator's best learning rate per method
    runtime_methods = (
        [m for m in METHODS if m.name in ("eamsgd", "downpour")] if quick else list(METHODS)
    )
    budget = 3.0 if quick else 8.0
    best_rate = {(r["method"]): r["best_lr"] for r in sim_rows if r["dataset"] == "digits"}
    runtime_rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in runtime_methods:
            results = [
                runtime_run(method, best_rate[method.label], seed, budget, Path(tmp))
                for seed in seeds
            ]
            grid = np.linspace(0, budget, 17)
            curves = np.array([np.interp(grid, r["times"], r["errors"]) for r in results])
            mean = curves.mean(0)
            hit = next(
                (float(t) for t, e in zip(grid, mean, strict=True) if e <= TARGETS["digits"]), None
            )
            summaries = [r["summary"] for r in results]
            runtime_rows.append({
                "dataset": "digits", "method": method.label, "algorithm": method.name, "tau": method.period,
                "lr": best_rate[method.label], "seeds": len(seeds), "wall_budget_s": budget,
                "final_test_error": float(np.mean([s["test_error"] for s in summaries])),
                "best_test_error": float(mean.min()), "time_to_target_s": hit,
                "steps_per_worker": float(np.mean([s["worker_steps"] / s["workers"] for s in summaries])),
                "exchanges": float(np.mean([s["exchanges"] for s in summaries])),
                "_times": grid.tolist(), "_curve": mean.tolist(),
            })  # fmt: skip

    tag = suffix(quick)
    public = lambda rows: [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]  # noqa: E731
    write_csv(args.out / f"compare_sim{tag}.csv", public(sim_rows))
    write_csv(args.out / f"compare_tau_sweep{tag}.csv", public(sweep_rows))
    write_csv(args.out / f"compare_runtime{tag}.csv", public(runtime_rows))
    write_json(args.out / f"compare{tag}.json", {
        "quick": quick, "duration_virtual": duration, "seeds": list(seeds), "targets": TARGETS,
        "sim": public(sim_rows), "tau_sweep": public(sweep_rows), "runtime": public(runtime_rows),
    })  # fmt: skip
    markdown = report(sim_rows, sweep_rows, runtime_rows)
    (args.out / f"compare{tag}.md").write_text(markdown)
    plot(sim_rows, sweep_rows, runtime_rows, args.out / f"compare{tag}.png")
    print(markdown)


def _fmt(value: Any) -> str:
    if value is None:
        return "never"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def report(sim_rows: list, sweep_rows: list, runtime_rows: list) -> str:
    lines = ["## Simulator (virtual time; the paper's one-GPU-per-worker setting)", ""]
    lines += [
        "| dataset | method | best lr | final err % | best err % | time to target | steps/worker |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sim_rows:
        lines.append(
            f"| {r['dataset']} | {r['method']} | {r['best_lr']:g} | {100 * r['final_test_error']:.2f} | {100 * r['best_test_error']:.2f} | {_fmt(r['time_to_target'])} (≤{100 * r['target']:.0f}%) | {r['steps_per_worker']} |"
        )
    lines += ["", "## tau sweep (simulator, best lr per cell: final test error %)", ""]
    datasets = sorted({r["dataset"] for r in sweep_rows})
    for dataset in datasets:
        lines += [
            f"**{dataset}**",
            "",
            "| method | " + " | ".join(f"tau={t}" for t in PERIODS) + " |",
            "|---" * (len(PERIODS) + 1) + "|",
        ]
        for name in SWEPT:
            cells = {
                r["tau"]: r
                for r in sweep_rows
                if r["dataset"] == dataset and r["algorithm"] == name
            }
            lines.append(
                f"| {name} | "
                + " | ".join(
                    f"{100 * cells[t]['final_test_error']:.2f}"
                    + (" (div)" if cells[t]["diverged_rates"] else "")
                    for t in PERIODS
                )
                + " |"
            )
        lines.append("")
    lines += ["## Real runtime (wall-clock, digits, 2 shared CPU cores)", ""]
    lines += [
        "| method | lr | final err % | best err % | time to ≤5% (s) | steps/worker | exchanges |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runtime_rows:
        lines.append(
            f"| {r['method']} | {r['lr']:g} | {100 * r['final_test_error']:.2f} | {100 * r['best_test_error']:.2f} | {_fmt(r['time_to_target_s'])} | {r['steps_per_worker']:.0f} | {r['exchanges']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot(sim_rows: list, sweep_rows: list, runtime_rows: list, out: Path) -> None:
    datasets = sorted({r["dataset"] for r in sim_rows})
    fig, axes = plt.subplots(1, len(datasets) + 2, figsize=(5.2 * (len(datasets) + 2), 4.2))
    for ax, dataset in zip(axes, datasets, strict=False):
        for r in (r for r in sim_rows if r["dataset"] == dataset):
            ax.plot(r["_times"], [100 * e for e in r["_curve"]], label=r["method"])
        ax.set(
            title=f"simulator: {dataset}",
            xlabel="virtual time (worker steps)",
            ylabel="center test error (%)",
            yscale="log",
        )
        ax.legend(fontsize=7)
    ax = axes[len(datasets)]
    for r in runtime_rows:
        ax.plot(r["_times"], [100 * e for e in r["_curve"]], label=r["method"])
    ax.set(
        title="real runtime: digits",
        xlabel="wall-clock (s)",
        ylabel="center test error (%)",
        yscale="log",
    )
    ax.legend(fontsize=7)
    ax = axes[-1]
    for name in SWEPT:
        cells = sorted(
            (r["tau"], r["final_test_error"])
            for r in sweep_rows
            if r["algorithm"] == name and r["dataset"] == datasets[0]
        )
        ax.plot([c[0] for c in cells], [100 * c[1] for c in cells], marker="o", label=name)
    ax.set(
        title=f"tau sweep ({datasets[0]}, simulator)",
        xlabel="tau",
        ylabel="final test error (%)",
        xscale="log",
        yscale="log",
    )
    ax.legend(fontsize=7)
    for a in axes:
        a.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
