"""The paper's comparison protocol on the simulator's cost-model clock (easgd.sim.cost).

Tasks (generated offline): MNIST-1D with the MNIST-1D paper's 1-D CNN, and an overfitting regime
(500 training sequences, a 2.5x wider CNN). Every method is tuned by the same protocol:

1. Grid stage, p = 4 (sequential SGD/MSGD p = 1), ``measured`` cost profile: for every method and
   tau in {1, 4, 16, 64} (MDOWNPOUR: tau = 1, the spec) a log-spaced learning-rate grid, 6 values
   over 2.5 decades (9 over 4 decades for the momentum methods, delta = 0.99), seed 0; the rate
   with the lowest test error reached within the budget wins; then seeds 1 and 2 at every chosen
   setting (3 seeds).
2. Speed-up stage: p in {4, 8, 16} with EASGD/EAMSGD, local SGD and DiLoCo at tau = 10 and
   DOWNPOUR/MDOWNPOUR at tau = 1, the rate chosen again for every (method, p) by the same rule (seed 0, ``measured``);
   then, under each cost profile (``measured`` and the ``ethernet_1g`` cluster profile), 3 seeds
   at the chosen rate, each run stopped when the center reaches the task's threshold: 1.1 times
   the better sequential baseline's best test error (mean of 3 seeds), rounded up to a percent.
   The time to threshold is compared with SGD/MSGD at p = 1.

Virtual time is counted in steps of the task's model (one gradient step of one worker = 1); every
run gets the same virtual-time budget. Each run's result is cached (one JSON line per run in
``results/compare_cache.jsonl``), so the full protocol can be run in chunks that add up.

The protocol at scale (``--scale``, issue 21; rules in docs/comparison.md, fixed before any
result): the same two stages and thresholds at 3,000 model steps per run, the grid stage in the
``zero`` (free) regime; the speed-up stage at p in {4, 8, 16, 32, 64}, each (method, p)'s rate
chosen among the grid stage's winner and its two grid neighbours (seed 0, free), then 3 seeds
under three regimes: free (``zero``), 10 GbE with a 25M-parameter model (``cluster_10gbe``) and
cross-datacenter (``cross_datacenter``). Results go to ``compare_scale*``.

    python benchmarks/compare.py --max-minutes 9   # full protocol, resumable; rerun until done
    python benchmarks/compare.py --quick           # a miniature of the protocol (< 1 min)
    python benchmarks/compare.py --scale --procs 16 --max-minutes 600   # at scale (~40 core-hours)
    python benchmarks/compare.py --scale --quick   # its miniature (< 1 min)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import multiprocessing as mp
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from _common import parser, suffix, write_csv, write_json  # noqa: E402

from easgd.algorithms.registry import spec_of  # noqa: E402
from easgd.config.algorithm import AlgorithmConfig  # noqa: E402
from easgd.config.schema import CommConfig, CostConfig, DataConfig, ModelConfig, TrainConfig  # noqa: E402
from easgd.parts.build import build_model, build_split  # noqa: E402
from easgd.sim import ClassifierObjective  # noqa: E402
from easgd.topologies.simulate import build_simulation, resolve_cost  # noqa: E402

PLAIN_RATES = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
MOMENTUM_RATES = (3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3)
MOMENTUM = 0.99
PERIODS = (1, 4, 16, 64)
WORKERS = (4, 8, 16)
SEEDS = (0, 1, 2)
REGIMES = {"zero": "free", "cluster_10gbe": "10 GbE, 25M-parameter model",
           "cross_datacenter": "cross-datacenter"}  # fmt: skip
"""Plain names for the at-scale protocol's cost profiles (configs/cost/)."""
COSTS = Path(__file__).resolve().parents[1] / "configs" / "cost"


@dataclass(frozen=True)
class Method:
    """One contender and its grid."""

    label: str
    name: str
    momentum: float
    rates: tuple[float, ...]
    periods: tuple[int, ...]
    speedup_period: int | None
    """tau of the speed-up stage (None: sequential, p = 1)."""

    @property
    def sequential(self) -> bool:
        return self.speedup_period is None


METHODS = (
    Method("EASGD", "easgd", 0.0, PLAIN_RATES, PERIODS, 10),
    Method("EAMSGD", "eamsgd", MOMENTUM, MOMENTUM_RATES, PERIODS, 10),
    Method("DOWNPOUR", "downpour", 0.0, PLAIN_RATES, PERIODS, 1),
    Method("MDOWNPOUR", "mdownpour", MOMENTUM, MOMENTUM_RATES, (1,), 1),
    # what people pick instead (issue 20), synchronous over all-reduce (topology=allreduce: each
    # round charged as a ring all-reduce); SGD inside, tuned like the rest (tau = H grid, rate
    # grid, seeds); DiLoCo's outer step at the paper's lr_out 0.7, mu 0.9
    Method("LocalSGD", "localsgd", 0.0, PLAIN_RATES, PERIODS, 10),
    Method("DiLoCo", "diloco", 0.0, PLAIN_RATES, PERIODS, 10),
    Method("SGD", "sgd", 0.0, PLAIN_RATES, (1,), None),
    Method("MSGD", "msgd", MOMENTUM, MOMENTUM_RATES, (1,), None),
)


@dataclass(frozen=True)
class Task:
    """A dataset and model."""

    name: str
    data: DataConfig
    model: ModelConfig


TASKS = (
    Task("mnist1d", DataConfig(name="mnist1d"), ModelConfig(name="cnn1d", channels=25)),
    Task(
        "overfit",
        DataConfig(name="mnist1d", train_subset=500),
        ModelConfig(name="cnn1d", channels=64),
    ),
)


@dataclass(frozen=True)
class Protocol:
    """The sizes of one run of the protocol (full or quick, at the first scale or at scale)."""

    name: str
    """Prefix of its result files (and cache)."""
    budget: float
    """Virtual time of every run, in model steps."""
    periods: tuple[int, ...]
    workers: tuple[int, ...]
    seeds: tuple[int, ...]
    rates_kept: int | None
    """Quick mode keeps only the middle few rates of each grid."""
    tasks: tuple[Task, ...]
    grid_profile: str = "measured"
    """The cost profile of the grid stage and of the speed-up stage's choice of rate."""
    profiles: tuple[str, ...] = ("measured", "ethernet_1g")
    """The cost profiles the speed-up stage reports under."""
    retune_near_grid: bool = False
    """The speed-up stage chooses each (method, p)'s rate among the grid stage's winner (at the
    grid tau nearest the speed-up tau, in log) and its two grid neighbours, not the whole grid."""
    grid_evals: int = 20
    speedup_evals: int = 40


FULL = Protocol("compare", 300.0, PERIODS, WORKERS, SEEDS, None, TASKS)
QUICK = Protocol("compare", 24.0, (1, 4), (4, 8), (0, 1), 2, TASKS[:1])
SCALE = Protocol("compare_scale", 3000.0, PERIODS, (4, 8, 16, 32, 64), SEEDS, None, TASKS,
                 grid_profile="zero", profiles=tuple(REGIMES), retune_near_grid=True,
                 speedup_evals=60)  # fmt: skip
"""Issue 21: 10x the budget, p up to 64, free / 10 GbE / cross-datacenter (docs/comparison.md)."""
SCALE_QUICK = dataclasses.replace(SCALE, budget=24.0, periods=(1, 4), workers=(4, 8), seeds=(0, 1),
                                  rates_kept=3, tasks=TASKS[:1], speedup_evals=40,
                                  profiles=("zero", "cross_datacenter"))  # fmt: skip


def rates_of(method: Method, protocol: Protocol) -> tuple[float, ...]:
    if protocol.rates_kept is None:
        return method.rates
    middle = len(method.rates) // 2
    return method.rates[middle - 1 : middle - 1 + protocol.rates_kept]


# -- one run ---------------------------------------------------------------------------------------


def profile_config(name: str) -> CostConfig:
    from omegaconf import OmegaConf

    loaded = OmegaConf.merge(
        OmegaConf.structured(CostConfig), OmegaConf.load(COSTS / f"{name}.yaml")
    )
    obj = OmegaConf.to_object(loaded)
    assert isinstance(obj, CostConfig)
    return obj


def topology_of(name: str) -> str:
    """allreduce for the rules that average every worker at once (local SGD, DiLoCo), else the
    parameter server (the paper's asynchronous setting)."""
    return "server" if spec_of(name).parameter_server else "allreduce"


def train_config(job: dict[str, Any]) -> TrainConfig:
    task = next(t for t in TASKS if t.name == job["task"])
    return TrainConfig(
        algorithm=AlgorithmConfig(job["name"], learning_rate=job["lr"], momentum=job["momentum"]),
        topology=topology_of(job["name"]),
        model=task.model,
        data=task.data,
        cost=CostConfig(**job["cost"]),
        comm=CommConfig(period=job["period"]),
        mode="simulate",
        workers=job["workers"],
        steps_per_worker=10**9,
        max_wall_s=job["budget"] * job["cost"]["step_time_s"],
        eval_interval_s=job["eval_every"] * job["cost"]["step_time_s"],
        target_test_error=job["target"],
        seed=job["seed"],
        progress=False,
        tensorboard=False,
    )


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """One simulated run (in a pool process): its curve in model steps of virtual time."""
    cfg = train_config(job)
    simulator, _ = build_simulation(cfg)
    result = simulator.run()
    return {
        "key": job["key"],
        "times": [p.time for p in result.history],
        "errors": [p.test_error for p in result.history],
        "exchanges": result.exchanges,
        "steps": result.steps,
        "stop_reason": result.stop_reason,
    }


def job_key(job: dict[str, Any]) -> str:
    text = json.dumps({k: v for k, v in job.items() if k != "key"}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:20]


class Cache:
    """Finished runs, one JSON line each; appended as runs finish."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.runs: dict[str, dict[str, Any]] = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                if line.strip():
                    run = json.loads(line)
                    self.runs[run["key"]] = run

    def add(self, run: dict[str, Any]) -> None:
        self.runs[run["key"]] = run
        with open(self.path, "a") as handle:
            handle.write(json.dumps(run) + "\n")


class OutOfTime(Exception):
    """The chunk's time is spent; rerun to continue."""


_POOL: list[Any] = []
"""The invocation's worker processes (``--procs``, default 2), started at the first job and kept
for every stage (each one loads torch and the data once, not once per stage)."""
_PROCS = [2]


def pool() -> Any:
    if not _POOL:
        _POOL.append(mp.get_context("spawn").Pool(_PROCS[0], initializer=_one_thread))
    return _POOL[0]


def _one_thread() -> None:
    """One torch thread per pool process: the processes, not threads, use the cores."""
    import torch

    torch.set_num_threads(1)


def close_pool() -> None:
    """Stop the worker processes (runs in progress are abandoned, not cached)."""
    while _POOL:
        workers = _POOL.pop()
        workers.terminate()
        workers.join()


def run_all(jobs: list[dict[str, Any]], cache: Cache, deadline: float) -> list[dict[str, Any]]:
    """Every job's result, running the missing ones on 2 processes until ``deadline``."""
    for job in jobs:
        job["key"] = job_key(job)
    missing = [job for job in jobs if job["key"] not in cache.runs]
    unique = list({job["key"]: job for job in missing}.values())
    if unique and time.time() > deadline:
        raise OutOfTime
    if unique:
        print(
            f"  running {len(unique)} simulations ({len(jobs) - len(missing)} cached)", flush=True
        )
        by_key = {job["key"]: job for job in unique}
        for run in pool().imap_unordered(run_job, unique):
            cache.add({**by_key[run["key"]], **run})
            if time.time() > deadline:
                raise OutOfTime
    return [{**job, **cache.runs[job["key"]]} for job in jobs]


# -- the protocol --------------------------------------------------------------------------------


def resolved_costs(
    task: Task, protocol: Protocol, cache: Cache
) -> dict[tuple[str, str], dict[str, Any]]:
    """Each (profile, algorithm)'s cost as concrete numbers (measured once, then fixed per job).

    The cache pins them: a (profile, algorithm) with cached runs keeps the costs those runs used,
    and a new one (a method added later) takes the cached task's step time and measured link, so
    runs from an earlier invocation or machine stay comparable and their cache keys still match.
    """
    pinned, step_s, link = pinned_costs(task, cache)
    split = build_split(task.data)
    objective = ClassifierObjective(build_model(task.model, split, seed=0), split)
    costs = {}
    for profile in dict.fromkeys((protocol.grid_profile, *protocol.profiles)):
        for method in METHODS:
            if (profile, method.name) in pinned:
                costs[(profile, method.name)] = pinned[(profile, method.name)]
                continue
            cost = profile_config(profile)
            if step_s is not None and cost.step_time_s is None:
                cost.step_time_s = step_s
            if cost.measure_network and link is not None:
                cost.measure_network = False
                cost.latency_us, cost.bandwidth_gbps = link
            cfg = TrainConfig(
                algorithm=AlgorithmConfig(method.name, momentum=method.momentum),
                model=task.model,
                data=task.data,
                cost=cost,
                comm=CommConfig(period=1),
                topology=topology_of(method.name),
            )
            figures = resolve_cost(cfg, objective)
            costs[(profile, method.name)] = {
                "name": profile,
                "latency_us": figures.latency_s * 1e6,
                "bandwidth_gbps": figures.bandwidth_gbps,
                "service_us": figures.service_s * 1e6,
                "step_time_s": figures.step_time_s,
                # a cluster profile's model, charged while the math stays on the task's model
                # (absent otherwise, so the first protocol's cached runs keep their keys)
                **({} if cost.charged_params is None else {"charged_params": cost.charged_params}),
            }
    return costs


def pinned_costs(
    task: Task, cache: Cache
) -> tuple[dict[tuple[str, str], dict[str, Any]], float | None, tuple[float, float] | None]:
    """From the task's cached runs: the cost each (profile, algorithm) ran with, the step time,
    and the measured link (latency in us, bandwidth in Gb/s) of the ``measured`` profile. The
    step time is this machine's, so it comes from a profile that does not state its own."""
    pinned: dict[tuple[str, str], dict[str, Any]] = {}
    for run in cache.runs.values():
        if run.get("task") == task.name:
            pinned.setdefault((run["cost"]["name"], run["name"]), run["cost"])
    step_s = next(
        (
            c["step_time_s"]
            for (profile, _), c in pinned.items()
            if profile_config(profile).step_time_s is None
        ),
        None,
    )
    link = next(
        (
            (c["latency_us"], c["bandwidth_gbps"])
            for (profile, name), c in pinned.items()
            if profile == "measured" and topology_of(name) == "server" and spec_of(name).uses_server
        ),
        None,
    )
    return pinned, step_s, link


def job(
    task: Task, method: Method, *, lr: float, period: int, workers: int, seed: int,
    cost: dict[str, Any], protocol: Protocol, target: float | None, evals: int,
) -> dict[str, Any]:  # fmt: skip
    return {
        "task": task.name, "name": method.name, "label": method.label, "momentum": method.momentum,
        "lr": lr, "period": period, "workers": 1 if method.sequential else workers, "seed": seed,
        "cost": cost, "budget": protocol.budget, "eval_every": protocol.budget / evals, "target": target,
    }  # fmt: skip


def best_reached(run: dict[str, Any]) -> float:
    errors = [e for e in run["errors"] if math.isfinite(e)]
    return min(errors) if errors else 1.0


def grid_stage(
    task: Task, protocol: Protocol, costs: dict, cache: Cache, deadline: float
) -> list[dict]:
    """Seed 0 over every (method, tau, rate); then the other seeds at each (method, tau)'s best."""

    def make(method: Method, period: int, lr: float, seed: int) -> dict[str, Any]:
        return job(task, method, lr=lr, period=period, workers=4, seed=seed,
                   cost=costs[(protocol.grid_profile, method.name)], protocol=protocol, target=None,
                   evals=protocol.grid_evals)  # fmt: skip

    cells = [
        (m, t) for m in METHODS for t in m.periods if t in protocol.periods or m.periods == (1,)
    ]
    first = run_all(
        [make(m, t, lr, protocol.seeds[0]) for m, t in cells for lr in rates_of(m, protocol)],
        cache, deadline,
    )  # fmt: skip
    chosen = {}
    for method, period in cells:
        runs = [r for r in first if r["name"] == method.name and r["period"] == period]
        best = min(runs, key=best_reached)
        chosen[(method.name, period)] = best["lr"]
    more = run_all(
        [make(m, t, chosen[(m.name, t)], s) for m, t in cells for s in protocol.seeds],
        cache, deadline,
    )  # fmt: skip
    rows = []
    for method, period in cells:
        runs = [r for r in more if r["name"] == method.name and r["period"] == period]
        lr = chosen[(method.name, period)]
        rates = rates_of(method, protocol)
        rows.append({
            "task": task.name, "method": method.label, "algorithm": method.name, "tau": period,
            "workers": 1 if method.sequential else 4, "best_lr": lr,
            "lr_at_grid_edge": lr in (rates[0], rates[-1]),
            "best_test_error_mean": float(np.mean([best_reached(r) for r in runs])),
            "best_test_error_seeds": [best_reached(r) for r in runs],
            "final_test_error_mean": float(np.mean([r["errors"][-1] for r in runs])),
            "grid_seed0": {str(r["lr"]): best_reached(r) for r in first
                           if r["name"] == method.name and r["period"] == period},
            "_curves": [(r["times"], r["errors"]) for r in runs],
        })  # fmt: skip
    return rows


def threshold_of(grid_rows: list[dict[str, Any]]) -> float:
    """1.1 x the better of SGD's and MSGD's mean best test error, rounded up to a whole percent."""
    best = min(r["best_test_error_mean"] for r in grid_rows if r["algorithm"] in ("sgd", "msgd"))
    return math.ceil(100 * 1.1 * best - 1e-9) / 100


def loose_threshold_of(grid_rows: list[dict[str, Any]]) -> float:
    """The worse of SGD's and MSGD's mean best test error, rounded up to a whole percent."""
    worst = max(r["best_test_error_mean"] for r in grid_rows if r["algorithm"] in ("sgd", "msgd"))
    return math.ceil(100 * worst - 1e-9) / 100


def median_time(runs: list[dict[str, Any]], threshold: float) -> tuple[float | None, str]:
    """Median over seeds of the time to ``threshold`` (a seed that never gets there counts as
    infinite, so at least half must reach it), and how many seeds reached it."""
    hits = [time_to(r, threshold) for r in runs]
    reached = sum(h is not None for h in hits)
    median = float(np.median([math.inf if h is None else h for h in hits]))
    return (median if math.isfinite(median) else None), f"{reached}/{len(runs)}"


def time_to(run: dict[str, Any], threshold: float) -> float | None:
    return next(
        (t for t, e in zip(run["times"], run["errors"], strict=True) if e <= threshold), None
    )


def retune_rates(
    method: Method, protocol: Protocol, grid_rows: list[dict[str, Any]]
) -> tuple[float, ...]:
    """The rates the speed-up stage tries for ``method`` at every p: the whole grid, or (at scale)
    the grid stage's winner at the grid tau nearest the speed-up tau (in log; the larger on a
    tie) and its two neighbours on the grid (one at an edge)."""
    rates = rates_of(method, protocol)
    if not protocol.retune_near_grid:
        return rates
    period = method.speedup_period or 1
    rows = [r for r in grid_rows if r["algorithm"] == method.name]
    nearest = min(rows, key=lambda r: (abs(math.log(r["tau"] / period)), -r["tau"]))
    at = rates.index(nearest["best_lr"])
    return rates[max(0, at - 1) : at + 2]


def speedup_stage(
    task: Task, protocol: Protocol, costs: dict, grid_rows: list[dict], threshold: float,
    loose: float, cache: Cache, deadline: float, partial: list[str] | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Every (profile, method, p) row of the speed-up stage, worker counts cheapest first.

    Each p's rate choice (``retune_rates`` on seed 0 in the grid profile) depends only on runs at
    that p, so p is done whole (choice, then every profile and seed) before the next starts: a run
    cut short by its deadline leaves the small p finished. ``partial``: on ``OutOfTime``, append
    the unfinished worker counts there and return the finished ones' rows, instead of raising."""
    sequential_lr = {r["algorithm"]: r["best_lr"] for r in grid_rows if r["workers"] == 1}
    rows: list[dict[str, Any]] = []
    counts = (1, *sorted(protocol.workers))
    for at, workers in enumerate(counts):
        methods = [m for m in METHODS if m.sequential == (workers == 1)]
        try:
            lr_of = sequential_lr if workers == 1 else chosen_rates(
                task, protocol, costs, grid_rows, workers, cache, deadline)  # fmt: skip
            jobs = [
                {**job(task, m, lr=lr_of[m.name], period=m.speedup_period or 1, workers=workers,
                       seed=seed, cost=costs[(profile, m.name)], protocol=protocol,
                       target=threshold, evals=protocol.speedup_evals), "profile": profile}
                for profile in protocol.profiles for m in methods for seed in protocol.seeds
            ]  # fmt: skip
            runs = run_all(jobs, cache, deadline)
        except OutOfTime:
            if partial is None:
                raise
            partial += [f"p={p}" for p in counts[at:]]
            break
        rows += [speedup_row(task, protocol, profile, m, workers, runs, threshold, loose)
                 for profile in protocol.profiles for m in methods]  # fmt: skip
    order = {m.name: i for i, m in enumerate(METHODS)}
    return sorted(rows, key=lambda r: (protocol.profiles.index(r["profile"]),
                                        order[r["algorithm"]], r["workers"]))  # fmt: skip


def chosen_rates(
    task: Task, protocol: Protocol, costs: dict, grid_rows: list[dict], workers: int,
    cache: Cache, deadline: float,
) -> dict[str, float]:  # fmt: skip
    """Each distributed method's rate at ``workers``: the best of ``retune_rates`` on seed 0."""
    distributed = [m for m in METHODS if not m.sequential]
    tuning = run_all([
        job(task, m, lr=lr, period=m.speedup_period or 1, workers=workers, seed=protocol.seeds[0],
            cost=costs[(protocol.grid_profile, m.name)], protocol=protocol, target=None,
            evals=protocol.grid_evals)
        for m in distributed for lr in retune_rates(m, protocol, grid_rows)
    ], cache, deadline)  # fmt: skip
    return {
        m.name: min([r for r in tuning if r["name"] == m.name], key=best_reached)["lr"]
        for m in distributed
    }


def speedup_row(
    task: Task, protocol: Protocol, profile: str, method: Method, workers: int,
    runs: list[dict[str, Any]], threshold: float, loose: float,
) -> dict[str, Any]:  # fmt: skip
    """One (profile, method, p) line of the speed-up table: median times over the seeds."""
    group = [r for r in runs if r["profile"] == profile and r["name"] == method.name]
    tight_time, tight_seeds = median_time(group, threshold)
    loose_time, loose_seeds = median_time(group, loose)
    step_s = group[0]["cost"]["step_time_s"]
    rates = rates_of(method, protocol)
    return {
        "task": task.name, "profile": profile, "method": method.label, "step_time_s": step_s,
        "algorithm": method.name, "workers": workers, "tau": group[0]["period"],
        "lr": group[0]["lr"], "lr_at_grid_edge": group[0]["lr"] in (rates[0], rates[-1]),
        "threshold": threshold, "time_to_threshold": tight_time, "seeds_reached": tight_seeds,
        "time_to_threshold_s": None if tight_time is None else tight_time * step_s,
        "loose_threshold": loose, "time_to_loose": loose_time, "seeds_reached_loose": loose_seeds,
        "time_to_loose_s": None if loose_time is None else loose_time * step_s,
        "best_test_error_mean": float(np.mean([best_reached(r) for r in group])),
        "exchanges_mean": float(np.mean([r["exchanges"] for r in group])),
    }  # fmt: skip


# -- report ----------------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "never"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def report(results: dict[str, Any], protocol: Protocol) -> str:
    lines = []
    for task in results["tasks"]:
        name, grid, speed = task["task"], task["grid"], task["speedup"]
        lines += [f"## {name}: grid stage (p = 4, SGD/MSGD p = 1; `{protocol.grid_profile}` "
                  f"profile; {protocol.budget:g} model steps per run)", ""]  # fmt: skip
        lines += ["Best test error reached (%, mean of the seeds at the chosen rate) per tau:", ""]
        periods = sorted({r["tau"] for r in grid})
        lines += ["| method | " + " | ".join(f"tau={t}" for t in periods) + " |",
                  "|---" * (len(periods) + 1) + "|"]  # fmt: skip
        for method in METHODS:
            cells = {r["tau"]: r for r in grid if r["algorithm"] == method.name}
            row = [f"{100 * cells[t]['best_test_error_mean']:.1f} (lr {cells[t]['best_lr']:g}"
                   + (", edge" if cells[t]["lr_at_grid_edge"] else "") + ")"
                   if t in cells else "" for t in periods]  # fmt: skip
            lines.append(f"| {method.label} | " + " | ".join(row) + " |")
        tight, loose = 100 * task["threshold"], 100 * task["loose_threshold"]
        lines += ["", f"Thresholds: tight {tight:.0f}% (1.1 x the better sequential baseline's best), "
                  f"loose {loose:.0f}% (the worse sequential baseline's best).", ""]  # fmt: skip
        for profile in protocol.profiles if speed else ():
            rows = [r for r in speed if r["profile"] == profile]
            step_ms = 1000 * rows[0]["step_time_s"]
            lines += [f"### {name}, profile `{profile}` (time in model steps; one step = {step_ms:.2f} ms)", "",
                      f"| method | p | tau | lr | time to {tight:.0f}% | seeds | time to {loose:.0f}% | seeds | lowest err % before stop | exchanges |",
                      "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
            for r in rows:
                edge = " (edge)" if r["lr_at_grid_edge"] else ""
                lines.append(
                    f"| {r['method']} | {r['workers']} | {r['tau']} | {r['lr']:g}{edge} | {fmt(r['time_to_threshold'])} | {r['seeds_reached']} | "
                    f"{fmt(r['time_to_loose'])} | {r['seeds_reached_loose']} | {100 * r['best_test_error_mean']:.1f} | {r['exchanges_mean']:.0f} |"
                )  # fmt: skip
            for key, level in (("time_to_threshold", tight), ("time_to_loose", loose)):
                timed = [r for r in rows if r[key] is not None]
                first = min(timed, key=lambda r: r[key]) if timed else None
                lines.append(
                    f"- first to {level:.0f}%: " + (f"{first['method']} p={first['workers']} ({fmt(first[key])} steps)" if first else "nobody (median of 3 seeds)")
                )  # fmt: skip
            lines.append("")
        if speed:
            lines += first_map(speed, protocol, tight)
    lines += ["## Cost profiles (per exchange, in model steps)", "",
              "| task | profile | algorithm | step time (ms) | latency | transfer | service |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for task in results["tasks"]:
        for c in task["charges"]:
            lines.append(f"| {task['task']} | {c['profile']} | {c['algorithm']} | {1000 * c['step_time_s']:.3f} | "
                         f"{c['latency']:.4f} | {c['transfer']:.4f} | {c['service']:.5f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def first_map(speed: list[dict[str, Any]], protocol: Protocol, tight: float) -> list[str]:
    """Which method reaches the tight threshold first, for each (profile, p); the best
    sequential baseline (p = 1) beside it."""
    lines = [f"Who reaches {tight:.0f}% first (median time in model steps; best p = 1 baseline "
             "in the last column):", "",
             "| profile | " + " | ".join(f"p={p}" for p in protocol.workers) + " | p=1 |",
             "|---" * (len(protocol.workers) + 2) + "|"]  # fmt: skip
    for profile in protocol.profiles:
        cells = []
        for workers in (*protocol.workers, 1):
            timed = [r for r in speed if r["profile"] == profile and r["workers"] == workers
                     and r["time_to_threshold"] is not None]  # fmt: skip
            first = min(timed, key=lambda r: r["time_to_threshold"]) if timed else None
            ran = any(r["profile"] == profile and r["workers"] == workers for r in speed)
            cells.append(
                f"{first['method']} ({fmt(first['time_to_threshold'])})" if first
                else "nobody" if ran else "not run yet"
            )  # fmt: skip
        label = REGIMES.get(profile, profile)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def plot(results: dict[str, Any], protocol: Protocol, out: Path) -> None:
    tasks = results["tasks"]
    profiles = protocol.profiles
    fig, axes = plt.subplots(
        len(tasks),
        1 + len(profiles),
        figsize=(6 * (1 + len(profiles)), 4.5 * len(tasks)),
        squeeze=False,
    )
    for row, task in zip(axes, tasks, strict=True):
        ax = row[0]
        color_of = {m.name: f"C{i}" for i, m in enumerate(METHODS)}  # one colour per method
        for r in task["grid"]:
            if r["tau"] not in (1, 16) or (
                r["algorithm"] in ("mdownpour", "sgd", "msgd") and r["tau"] != 1
            ):
                continue
            times = np.array(r["_curves"][0][0])
            curve = np.mean([np.interp(times, t, e) for t, e in r["_curves"]], axis=0)
            label = r["method"] + (
                "" if r["algorithm"] in ("mdownpour", "sgd", "msgd") else f" tau={r['tau']}"
            )
            ax.plot(times, 100 * curve, "--" if r["tau"] == 16 else "-",
                    color=color_of[r["algorithm"]], label=label)  # fmt: skip
        ax.axhline(100 * task["threshold"], color="gray", ls=":")
        ax.axhline(100 * task["loose_threshold"], color="gray", ls="-.")
        ax.set(title=f"{task['task']}: grid stage at the chosen rates", xlabel="virtual time (model steps)",
               ylabel="center test error (%)", yscale="log")  # fmt: skip
        ax.legend(fontsize=7)
        for ax, profile in zip(row[1:], profiles, strict=True):
            rows = [r for r in task["speedup"] if r["profile"] == profile]
            if not rows:
                ax.set_axis_off()
                continue
            tight, loose = 100 * task["threshold"], 100 * task["loose_threshold"]
            levels = [("time_to_loose", "-", loose), ("time_to_threshold", "--", tight)]
            if round(tight) == round(loose):  # one threshold (the rule can make them coincide)
                levels = levels[1:2]
            for key, style, level in levels:
                for color, method in enumerate(m for m in METHODS if not m.sequential):
                    mine = [r for r in rows if r["algorithm"] == method.name and r[key]]
                    ax.plot([r["workers"] for r in mine], [r[key] for r in mine], style, marker="o",
                            color=f"C{color}", label=f"{method.label} tau={method.speedup_period}, {level:.0f}%")  # fmt: skip
                base = min((r[key] for r in rows if r["workers"] == 1 and r[key]), default=None)
                if base:
                    ax.axhline(
                        base, color="gray", ls=style, label=f"best p=1 (SGD/MSGD), {level:.0f}%"
                    )
            wanted = (f"{tight:.0f}%" if len(levels) == 1
                      else f"{loose:.0f}% (solid), {tight:.0f}% (dashed)")  # fmt: skip
            ax.set(title=f"{task['task']}, {REGIMES.get(profile, profile)}: time to {wanted}",
                   xlabel="p", ylabel="virtual time to threshold (model steps)", xscale="log", yscale="log")  # fmt: skip
            # the p range even where no method reaches a threshold (a log axis needs limits > 0)
            ax.set_xlim(min(protocol.workers) / 1.2, max(protocol.workers) * 1.2)
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xticks(list(protocol.workers), [str(w) for w in protocol.workers])
            ax.legend(fontsize=7)
    for ax in axes.flat:
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def charges_of(costs: dict) -> Iterable[dict[str, Any]]:
    from easgd.sim.cost import exchange_cost

    for (profile, name), c in costs.items():
        if name in ("sgd", "msgd"):
            continue  # sequential runs never exchange
        task_params = c.get("charged_params") or c["num_params"]
        charges = exchange_cost(latency_s=c["latency_us"] * 1e-6, bandwidth_gbps=c["bandwidth_gbps"],
                                service_s=c["service_us"] * 1e-6, num_params=task_params,
                                step_time_s=c["step_time_s"])  # fmt: skip
        yield {"profile": profile, "algorithm": name, "step_time_s": c["step_time_s"],
               "latency": charges.latency, "transfer": charges.transfer, "service": charges.service}  # fmt: skip


def main() -> None:
    try:
        run_protocol()
    finally:
        close_pool()


def run_protocol() -> None:
    arguments = parser(__doc__ or "")
    arguments.add_argument("--max-minutes", type=float, default=9.0,
                           help="stop after this long (rerun to continue from the cache)")  # fmt: skip
    arguments.add_argument("--report-only", action="store_true",
                           help="run nothing: report the tasks whose runs are all cached")  # fmt: skip
    arguments.add_argument("--scale", action="store_true",
                           help="the protocol at scale (issue 21): 3,000 steps, p up to 64, "
                                "free / 10 GbE / cross-datacenter regimes")  # fmt: skip
    arguments.add_argument("--procs", type=int, default=2,
                           help="simulations run side by side (one process and torch thread each)")  # fmt: skip
    args = arguments.parse_args()
    if args.procs < 1:
        arguments.error(f"--procs must be >= 1, got {args.procs}")
    _PROCS[0] = args.procs
    protocol = {(False, False): FULL, (True, False): QUICK, (False, True): SCALE,
                (True, True): SCALE_QUICK}[(args.quick, args.scale)]  # fmt: skip
    tag = suffix(args.quick)
    cache = Cache(args.out / f"{protocol.name}_cache{tag}.jsonl")
    args.out.mkdir(parents=True, exist_ok=True)
    deadline = 0.0 if args.report_only else time.time() + 60 * args.max_minutes
    results: dict[str, Any] = {"quick": args.quick, "protocol": {
        "budget_steps": protocol.budget, "periods": protocol.periods, "workers": protocol.workers,
        "seeds": protocol.seeds, "plain_rates": PLAIN_RATES, "momentum_rates": MOMENTUM_RATES,
        "momentum": MOMENTUM, "grid_profile": protocol.grid_profile, "profiles": protocol.profiles,
        "retune_near_grid": protocol.retune_near_grid}, "tasks": [], "incomplete": []}  # fmt: skip
    for task in protocol.tasks:
        try:
            print(f"{task.name}: costs, grid stage", flush=True)
            costs = resolved_costs(task, protocol, cache)
            split = build_split(task.data)
            numel = ClassifierObjective(
                build_model(task.model, split, seed=0), split
            ).flat.num_params
            grid = grid_stage(task, protocol, costs, cache, deadline)
            threshold = threshold_of(grid)
            print(f"{task.name}: speed-up stage (threshold {100 * threshold:.0f}%)", flush=True)
            loose = loose_threshold_of(grid)
            partial: list[str] = []
            speed = speedup_stage(task, protocol, costs, grid, threshold, loose, cache, deadline,
                                  partial=partial if args.report_only else None)  # fmt: skip
            if partial:  # report the finished worker counts (or the grid stage alone)
                results["incomplete"].append(f"{task.name} (speed-up stage, {', '.join(partial)})")
            for c in costs.values():
                c["num_params"] = numel
            results["tasks"].append({"task": task.name, "num_params": numel, "threshold": threshold,
                                         "step_time_s": costs[(protocol.grid_profile, "sgd")]["step_time_s"],
                                         "loose_threshold": loose, "grid": grid, "speedup": speed, "charges": list(charges_of(costs))})  # fmt: skip
        except OutOfTime:
            if not args.report_only:
                print(f"out of time: {len(cache.runs)} runs cached in {cache.path}; run again")
                sys.exit(3)
            results["incomplete"].append(task.name)
    if not results["tasks"]:
        sys.exit("nothing to report yet")
    public = [
        {k: v for k, v in r.items() if not k.startswith("_")}
        for t in results["tasks"]
        for r in t["grid"]
    ]
    name = protocol.name
    write_csv(args.out / f"{name}_grid{tag}.csv", public)
    speed = [r for t in results["tasks"] for r in t["speedup"]]
    if speed:
        write_csv(args.out / f"{name}_speedup{tag}.csv", speed)
    write_json(args.out / f"{name}{tag}.json", {**results, "tasks": [
        {**t, "grid": [{k: v for k, v in r.items() if not k.startswith("_")} for r in t["grid"]]}
        for t in results["tasks"]]})  # fmt: skip
    markdown = report(results, protocol)
    if results["incomplete"]:
        markdown += f"\nNot finished (runs missing): {', '.join(results['incomplete'])}\n"
    (args.out / f"{name}{tag}.md").write_text(markdown)
    plot(results, protocol, args.out / f"{name}{tag}.png")
    print(markdown)


if __name__ == "__main__":
    main()
