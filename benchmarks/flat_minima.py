"""Flat minima: does the EASGD / EAMSGD center sit in a wider minimum, and generalize better, than
the MSGD solution or a DOWNPOUR center reached at the SAME training loss?

Every method runs in the asynchronous simulator on MNIST-1D with the MNIST-1D paper's 1-D CNN
and stops at the first evaluation where the training loss (full training set) of its evaluated
variable (the center, or the single worker's point) reaches the target. At that point:
train and test loss and error, the top Hessian eigenvalue of the training loss (power iteration
on Hessian-vector products, full training set) and the mean training-loss increase under random
perturbations of relative size r ("relative": ||d|| = r ||x||; "filter": each filter / row / bias
of d has r times the norm of the same group of x), from easgd.analysis.

Learning rates are not tuned: every method takes the same effective step eta / (1 - delta) = 0.1
(delta = 0.9 for the momentum methods), so step size, which sets sharpness by itself, is equal.

    python benchmarks/flat_minima.py --quick                    # < 20 s, CI
    python benchmarks/flat_minima.py --jobs 2 --max-minutes 9   # full; rerun until complete
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from _claims import (  # noqa: E402
    Task,
    claims_parser,
    deadline_of,
    mnist1d_objective,
    run_cached,
    write_results,
)
from _common import suffix  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from easgd.analysis import (  # noqa: E402
    ProbedObjective,
    StopRun,
    TargetReached,
    classifier_loss,
    filter_groups,
    perturbation_loss_increase,
    top_hessian_eigenvalue,
)
from easgd.config.algorithm import AlgorithmConfig  # noqa: E402
from easgd.sim import SimConfig, Simulator  # noqa: E402


@dataclass(frozen=True)
class Method:
    """One contender: algorithm, workers, period, eta, delta."""

    label: str
    name: str
    workers: int
    period: int
    learning_rate: float
    momentum: float


METHODS = (
    Method("SGD", "sgd", 1, 1, 0.1, 0.0),
    Method("MSGD", "msgd", 1, 1, 0.01, 0.9),
    Method("DOWNPOUR", "downpour", 4, 1, 0.1, 0.0),
    Method("EASGD", "easgd", 4, 10, 0.1, 0.0),
    Method("EAMSGD", "eamsgd", 4, 10, 0.01, 0.9),
)


@dataclass(frozen=True)
class Plan:
    model: str
    hidden: tuple[int, ...]
    target_train_loss: float
    max_duration: float
    eval_interval: float
    seeds: tuple[int, ...]
    radii: tuple[float, ...]
    perturbation_samples: int
    power_iterations: int


FULL = Plan(
    model="cnn1d",
    hidden=(),
    target_train_loss=0.25,
    max_duration=5000.0,
    eval_interval=25.0,
    seeds=(0, 1, 2),
    radii=(0.01, 0.03, 0.1),
    perturbation_samples=10,
    power_iterations=60,
)
QUICK = Plan(
    model="mlp",
    hidden=(32,),
    target_train_loss=1.8,
    max_duration=400.0,
    eval_interval=10.0,
    seeds=(0,),
    radii=(0.1, 1.0),
    perturbation_samples=3,
    power_iterations=15,
)


def measure(*, method: dict[str, Any], seed: int, plan: dict[str, Any]) -> dict[str, Any]:
    """Run one method until the target train loss, then measure the point it stopped at."""
    m, p = Method(**method), Plan(**plan)
    algorithm = AlgorithmConfig(m.name, learning_rate=m.learning_rate, momentum=m.momentum)
    objective = mnist1d_objective(p.model, hidden=p.hidden, seed=seed)
    probed = ProbedObjective(objective, stop_train_loss=p.target_train_loss)
    sim = Simulator(
        algorithm,
        SimConfig(
            num_workers=m.workers,
            comm_period=m.period,
            duration=p.max_duration,
            eval_interval=p.eval_interval,
            seed=seed,
        ),
        probed,
    )
    probed.attach(sim)
    reached, diverged = False, False
    try:
        sim.run()
        point, record = sim.evaluated().clone(), probed.records[-1]
    except TargetReached as hit:
        point, record, reached = hit.point, hit.record, True
    except StopRun as stop:
        point, record, diverged = stop.point, stop.record, True
    split = objective.split
    module = objective.flat.module
    loss_fn = classifier_loss(module, split.train_x, split.train_y)
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(1000 + seed)
    top = top_hessian_eigenvalue(
        loss_fn, point, iterations=p.power_iterations, tolerance=1e-3, generator=generator
    )
    relative = perturbation_loss_increase(
        loss_fn, point, p.radii, samples=p.perturbation_samples, generator=generator
    )
    filtered = perturbation_loss_increase(
        loss_fn, point, p.radii, samples=p.perturbation_samples, scaling="filter",
        group_sizes=filter_groups(module), generator=generator,
    )  # fmt: skip
    return {
        "method": m.label,
        "seed": seed,
        "reached_target": reached,
        "diverged": diverged,
        "time": record.time,
        "worker_steps": record.steps,
        "train_loss": record.train_loss,
        "train_error": record.train_error,
        "test_loss": record.test_loss,
        "test_error": record.test_error,
        "top_eigenvalue": top.eigenvalue,
        "power_converged": top.converged,
        "power_iterations": top.iterations,
        "center_norm": record.center_norm,
        "perturbation_relative": relative,
        "perturbation_filter": filtered,
        "measure_s": time.perf_counter() - started,
    }


def tasks(plan: Plan) -> list[Task]:
    return [
        (f"{m.label}_s{seed}", {"method": asdict(m), "seed": seed, "plan": asdict(plan)})
        for m in METHODS
        for seed in plan.seeds
    ]


FIELDS = ("train_loss", "train_error", "test_loss", "test_error", "top_eigenvalue")


def summarize(plan: Plan, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method: mean and standard deviation over seeds of every figure."""
    rows = []
    for m in METHODS:
        mine = [r for r in runs if r["method"] == m.label]
        row: dict[str, Any] = {"method": m.label, "seeds": len(mine)}
        row["reached_target"] = sum(r["reached_target"] for r in mine)
        row["time"] = statistics.fmean(r["time"] for r in mine)
        for field in FIELDS:
            values = [r[field] for r in mine]
            row[field] = statistics.fmean(values)
            row[field + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        for scaling in ("relative", "filter"):
            for k, radius in enumerate(plan.radii):
                values = [r[f"perturbation_{scaling}"][k] for r in mine]
                row[f"{scaling}_r{radius:g}"] = statistics.fmean(values)
                row[f"{scaling}_r{radius:g}_std"] = (
                    statistics.stdev(values) if len(values) > 1 else 0.0
                )
        rows.append(row)
    return rows


def markdown(plan: Plan, rows: list[dict[str, Any]]) -> str:
    radius = plan.radii[len(plan.radii) // 2]
    head = (
        f"Stopped at train loss <= {plan.target_train_loss:g} (mean +- std over "
        f"{len(plan.seeds)} seeds); perturbation: mean train-loss increase at r = {radius:g}.\n\n"
        "| method | reached | time | train loss | train err % | test loss | test err % "
        f"| top eigenvalue | dL relative r={radius:g} | dL filter r={radius:g} |\n"
        + "|---" * 10
        + "|\n"
    )

    def pm(row: dict[str, Any], key: str, scale: float = 1.0, fmt: str = ".3g") -> str:
        return f"{scale * row[key]:{fmt}} +- {scale * row[key + '_std']:{fmt}}"

    lines = [
        f"| {r['method']} | {r['reached_target']}/{r['seeds']} | {r['time']:.0f} "
        f"| {pm(r, 'train_loss')} | {pm(r, 'train_error', 100, '.1f')} | {pm(r, 'test_loss')} "
        f"| {pm(r, 'test_error', 100, '.1f')} | {pm(r, 'top_eigenvalue')} "
        f"| {pm(r, f'relative_r{radius:g}')} | {pm(r, f'filter_r{radius:g}')} |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


def plot(plan: Plan, runs: list[dict[str, Any]]) -> Figure:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    for k, m in enumerate(METHODS):
        mine = [r for r in runs if r["method"] == m.label]
        color = f"C{k}"
        axes[0].scatter(
            [r["top_eigenvalue"] for r in mine], [100 * r["test_error"] for r in mine],
            color=color, label=m.label,
        )  # fmt: skip
        for scaling, style in (("relative", "o-"), ("filter", "s--")):
            mean = [
                statistics.fmean(r[f"perturbation_{scaling}"][j] for r in mine)
                for j in range(len(plan.radii))
            ]
            ax = axes[1] if scaling == "relative" else axes[2]
            ax.plot(plan.radii, mean, style, color=color, label=m.label)
    axes[0].set(
        xlabel="top Hessian eigenvalue (train loss)",
        ylabel="test error (%)",
        title=f"at train loss {plan.target_train_loss:g} (one dot per seed)",
    )
    for ax, scaling in ((axes[1], "relative"), (axes[2], "filter")):
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="perturbation radius r",
            ylabel="mean train-loss increase",
            title=f"random perturbations, {scaling} scaling",
        )
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    args = claims_parser(__doc__ or "").parse_args(argv)
    plan = QUICK if args.quick else FULL
    tag = "flat_minima" + suffix(args.quick)
    todo = tasks(plan)
    done, complete = run_cached(
        measure, todo, cache=args.out / f"{tag}_runs.jsonl", jobs=args.jobs,
        deadline=deadline_of(args.max_minutes),
    )  # fmt: skip
    if not complete:
        return 3
    runs = [done[key] for key, _ in todo]
    rows = summarize(plan, runs)
    write_results(
        args.out, tag, table=markdown(plan, rows), rows=rows,
        summary={"plan": asdict(plan), "methods": [asdict(m) for m in METHODS], "summary": rows,
                 "runs": runs},
        figure=plot(plan, runs),
    )  # fmt: skip
    return 0 if all(math.isfinite(r["top_eigenvalue"]) for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
