"""Scaling out: a sharded center's exchange capacity, and all-reduce EASGD against PyTorch's
PeriodicModelAverager, measured side by side in one set of processes.

Part A (capacity). p = 2 workers do nothing but exchange (EASGD, tau = 1, zero gradient) as fast
as they can with the real parameter server(s): k = 1, 2, 4 shard ranks (the unchanged
ParameterServer on each slice; workers reach the shards in parallel via ShardedTransport), for
models of 1M, 10M and 25M parameters. Reported: exchanges/s (summed over workers) and bytes/s
through the center (2 x 4 bytes x parameters per exchange), and the ratio to k = 1.

Part B (all-reduce). The same 2 ranks train an MLP on digits with synchronous EASGD, local SGD
and DiLoCo over all-reduce (easgd.engine.allreduce's loop, tau = H = 10) and, in the same
processes, with local SGD plus torch's PeriodicModelAverager (period 10): steps/s of each, the
ratios to torch's, and the same with rank 1 a 2x straggler (after computing each gradient it sleeps as long again: slow compute, not a
slow network). The two methods alternate, 6 rounds each (--rounds), and the per-round ratios are
kept to show the noise.

Everything runs on this machine's cores over loopback gloo; read docs/scaling.md for what that
can and cannot show.

    python benchmarks/scaling.py            # full: 1M/10M/25M x k = 1, 2, 4; about 5 minutes
    python benchmarks/scaling.py --quick    # 100k/1M x k = 1, 2 and a small MLP (< 30 s)
    python benchmarks/scaling.py --part allreduce   # Part B only (2 processes, about 4 minutes)
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from _common import parser, suffix, write_csv, write_json
from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

from easgd.comm.allreduce import AllReduceSum, init_world
from easgd.comm.groups import DistEnv
from easgd.comm.sharded import ShardedTransport, init_shard_groups
from easgd.comm.transport import PairTransport, WorkerTransport
from easgd.config.algorithm import AlgorithmConfig
from easgd.config.schema import ModelConfig
from easgd.data.digits import load_digits_split
from easgd.data.sampling import MinibatchSampler
from easgd.engine.allreduce import (
    ReplicatedCenterLoop,
    control_slots,
    rank_round,
    rank_worker,
    sampled_gradient,
)
from easgd.engine.server import ParameterServer
from easgd.engine.supervisor import Supervision, Supervisor
from easgd.engine.worker import WorkerLoop, handshake
from easgd.flat import FlatModel
from easgd.parts.build import build_model
from easgd.parts.runlog import RunLog
from easgd.roles import ElasticServer, ElasticWorker
from easgd.roles.sharded import shard_bounds
from easgd.topologies.launch import start_processes

WARMUP = 2
WORKERS = 2
OURS = ("easgd", "localsgd", "diloco")
"""easgd's rules timed over all-reduce in Part B (each against PeriodicModelAverager)."""


def rounds_for(size: int, quick: bool) -> int:
    budget = 3e7 if quick else 3e8
    return int(max(4, min(30, budget / size)))


def capacity(env: DistEnv, groups: Any, sizes: list[int], shard_counts: list[int], quick: bool):
    """Part A on every rank: shards serve, workers time their exchanges."""
    most = max(shard_counts)
    results = []
    for shards in shard_counts:
        for size in sizes:
            rounds = WARMUP + rounds_for(size, quick)
            bounds = shard_bounds(size, shards)
            dist.barrier()
            if env.rank < most:
                if env.rank < shards:
                    lo, hi = bounds[env.rank]
                    transports = {
                        w: PairTransport(peer=w, group=g, numel=hi - lo)
                        for w, g in groups.workers.items()
                    }
                    with tempfile.TemporaryDirectory() as tmp:
                        runlog = RunLog(tmp, tensorboard=False)
                        Supervisor(
                            ParameterServer(
                                ElasticServer(torch.zeros(hi - lo), moving_rate=0.1), transports
                            ),
                            lambda point: {"test_loss": 0.0, "test_error": 0.0},
                            runlog, Supervision(eval_interval_s=3600),
                        ).run()  # fmt: skip
                        runlog.close()
                continue
            links = [
                PairTransport(peer=j, group=groups.shards[j], numel=hi - lo)
                for j, (lo, hi) in enumerate(bounds)
            ]
            transport: WorkerTransport = (
                links[0] if shards == 1 else ShardedTransport(links, bounds)
            )
            role = ElasticWorker(
                handshake(transport), comm_period=1, learning_rate=0.0, momentum=0.0
            )
            zero = torch.zeros(size)
            loop = WorkerLoop(role, transport, lambda point, zero=zero: (0.0, zero), steps=rounds)
            loop.run()
            timed = list(loop.round_trips_ms)[WARMUP:]
            results.append(
                {"shards": shards, "params": size, "rounds": len(timed),
                 "mean_rtt_ms": sum(timed) / len(timed)}
            )  # fmt: skip
            del loop, role, transport, links, zero
    return results


def _mlp(hidden: list[int]) -> tuple[torch.nn.Module, Any]:
    split = load_digits_split(test_fraction=0.2, seed=0)
    return build_model(ModelConfig(name="mlp", hidden=hidden), split, seed=0), split


def _sleep_like(slowdown: float, started: float) -> None:
    if slowdown > 1.0:
        time.sleep((slowdown - 1.0) * (time.perf_counter() - started))


def allreduce_rate(
    name: str, index: int, group: Any, hidden: list[int], steps: int, tau: int, slowdown: float
) -> float:
    """Steps/s of rule ``name`` (easgd, localsgd, diloco; SGD inside) over all-reduce: the
    runtime's role, gradient, sum, round rule and loop."""
    model, split = _mlp(hidden)
    flat = FlatModel(model)
    sampler = MinibatchSampler(split, batch_size=128, worker_index=index, num_workers=WORKERS)
    config = AlgorithmConfig(name=name, learning_rate=0.01, momentum=0.0)
    role = rank_worker(config, flat, comm_period=tau)
    sampled = sampled_gradient(flat, sampler)

    def gradient(point: torch.Tensor) -> Any:
        started = time.perf_counter()
        loss_grad = sampled(point)
        _sleep_like(slowdown, started)  # a straggler computes slowly; its messages are not slow
        return loss_grad

    reduce = AllReduceSum(numel=flat.num_params, control_slots=control_slots(WORKERS), group=group)
    start = flat.initial_point()  # EASGD: alpha = beta / p = 0.9 / 2, as before
    rule = rank_round(config, start, num_workers=WORKERS, measure=False)
    loop = ReplicatedCenterLoop(
        role, start, reduce, gradient, rank=index, num_workers=WORKERS, steps=steps, rule=rule,
    )  # fmt: skip
    dist.barrier(group=group)
    return loop.run().steps_per_s


def periodic_averager_rate(
    index: int, group: Any, hidden: list[int], steps: int, tau: int, slowdown: float
) -> float:
    """Steps/s of local SGD with torch's PeriodicModelAverager (the comparison)."""
    model, split = _mlp(hidden)
    sampler = MinibatchSampler(split, batch_size=128, worker_index=index, num_workers=WORKERS)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    averager = PeriodicModelAverager(period=tau, warmup_steps=0, process_group=group)
    dist.barrier(group=group)
    started = time.perf_counter()
    for _ in range(steps):
        step_started = time.perf_counter()
        inputs, targets = sampler.sample()
        optimizer.zero_grad()
        F.cross_entropy(model(inputs), targets).backward()
        _sleep_like(slowdown, step_started)  # after the gradient, as in allreduce_rate
        optimizer.step()
        averager.average_parameters(model.parameters())
    return steps / (time.perf_counter() - started)


def allreduce_part(index: int, group: Any, quick: bool, rounds: int) -> list[dict[str, Any]]:
    """Part B on one worker rank: both methods alternately, ``rounds`` times each, per slowdown."""
    hidden, steps, tau = ([256], 200, 10) if quick else ([1024, 1024], 200, 10)
    part_b = []
    # one untimed run of each first: a fresh process's first run is slower (allocator, page
    # faults), which would bias the first cell (and in quick mode, with one round, the ratios)
    for name in OURS:
        allreduce_rate(name, index, group, hidden, steps, tau, 1.0)
    periodic_averager_rate(index, group, hidden, steps, tau, 1.0)
    for slowdown in (1.0, 2.0):
        mine = slowdown if index == WORKERS - 1 else 1.0
        rates: dict[str, list[float]] = {f"{n}_allreduce": [] for n in OURS}
        rates["periodic_averager"] = []
        for _ in range(rounds):  # alternate, so drift hits all alike
            for name in OURS:
                rates[f"{name}_allreduce"].append(
                    allreduce_rate(name, index, group, hidden, steps, tau, mine)
                )
            rates["periodic_averager"].append(
                periodic_averager_rate(index, group, hidden, steps, tau, mine)
            )
        part_b.append(
            {"straggler_slowdown": slowdown, "tau": tau, "hidden": hidden, "steps": steps,
             "rounds": rates}
        )  # fmt: skip
    return part_b


def bench_process(
    sizes: list[int], shard_counts: list[int], quick: bool, part: str, rounds: int
) -> dict[str, Any] | None:
    torch.set_num_threads(1)
    env = DistEnv.from_environ()
    if part == "allreduce":  # the two worker ranks only
        init_world(env, backend="gloo", timeout_s=300)
        result = {"capacity": [], "allreduce": allreduce_part(env.rank, None, quick, rounds)}
        dist.barrier()
        dist.destroy_process_group()
        return result
    most = max(shard_counts)
    groups = init_shard_groups(env, shards=most, backend="gloo", timeout_s=300)
    part_a = capacity(env, groups, sizes, shard_counts, quick)
    # Part B on the worker ranks only (their own group); shards wait at the final barrier
    worker_ranks = list(range(most, most + WORKERS))
    group = dist.new_group(worker_ranks)
    part_b = []
    if env.rank >= most and part == "all":
        part_b = allreduce_part(env.rank - most, group, quick, rounds)
    dist.barrier()
    dist.destroy_process_group()
    if env.rank < most:
        return None
    return {"capacity": part_a, "allreduce": part_b}


def capacity_rows(workers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Part A's table: exchanges/s and MB/s through the center per (k, model size)."""
    rows = []
    for i, cell in enumerate(workers[0]["capacity"]):
        mean_rtt = [w["capacity"][i]["mean_rtt_ms"] for w in workers]
        exchanges_per_s = sum(1000 / rtt for rtt in mean_rtt)
        rows.append({
            "shards": cell["shards"], "params": cell["params"], "workers": WORKERS,
            "mean_rtt_ms": sum(mean_rtt) / len(mean_rtt), "exchanges_per_s": exchanges_per_s,
            "center_MB_per_s": exchanges_per_s * 2 * 4 * cell["params"] / 1e6,
        })  # fmt: skip
    for row in rows:
        base = next(r for r in rows if r["params"] == row["params"] and r["shards"] == 1)
        row["ratio_to_one_shard"] = row["exchanges_per_s"] / base["exchanges_per_s"]
    return rows


def allreduce_rows(workers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Part B's table: the slowest rank's steps/s of each method, and each of ours over torch's
    (mean, spread).

    A synchronous run goes at its slowest rank's pace, so each round counts its slowest rank;
    the headline ratio is that of the rates averaged over rounds, and the per-round ratios show
    the noise (the methods of one round ran back to back). EASGD's columns keep their names
    (ratio_easgd_over_averager, ratio_median ...); local SGD's and DiLoCo's are prefixed.
    """
    rows = []
    for i, cell in enumerate(workers[0]["allreduce"]):
        methods = list(cell["rounds"])
        per_round = {
            method: [min(rates) for rates in zip(*(w["allreduce"][i]["rounds"][method]
                                                   for w in workers), strict=True)]
            for method in methods
        }  # fmt: skip
        mean = {m: sum(per_round[m]) / len(per_round[m]) for m in methods}
        row: dict[str, Any] = {
            **{k: cell[k] for k in ("straggler_slowdown", "tau", "steps")},
            "hidden": "x".join(map(str, cell["hidden"])),
            "rounds": len(per_round["periodic_averager"]),
            **{f"{m}_steps_per_s": mean[m] for m in methods},
        }
        for name in (n for n in OURS if f"{n}_allreduce" in per_round):
            ratios = [
                a / b
                for a, b in zip(
                    per_round[f"{name}_allreduce"], per_round["periodic_averager"], strict=True
                )
            ]
            prefix = "" if name == "easgd" else f"{name}_"
            row.update({
                f"ratio_{name}_over_averager": mean[f"{name}_allreduce"]
                / mean["periodic_averager"],
                f"{prefix}ratio_median": statistics.median(ratios),
                f"{prefix}ratio_min": min(ratios), f"{prefix}ratio_max": max(ratios),
                f"{prefix}ratio_per_round": " ".join(f"{r:.3f}" for r in ratios),
            })  # fmt: skip
        row.update({f"{m}_per_round": " ".join(f"{r:.1f}" for r in per_round[m]) for m in methods})
        rows.append(row)
    return rows


def main() -> None:
    cli = parser(__doc__ or "")
    cli.add_argument(
        "--part", choices=("all", "capacity", "allreduce"), default="all",
        help="all (default); capacity: Part A only; allreduce: Part B only (2 processes)",
    )  # fmt: skip
    cli.add_argument("--rounds", type=int, default=None, help="Part B rounds (default 6; quick 1)")
    args = cli.parse_args()
    quick, part = args.quick, args.part
    rounds = args.rounds or (1 if quick else 6)
    if rounds < 1:
        raise ValueError(f"--rounds={rounds}; give at least 1")
    sizes = [10**5, 10**6] if quick else [10**6, 10**7, 25 * 10**6]
    shard_counts = [1, 2] if quick else [1, 2, 4]
    most = 0 if part == "allreduce" else max(shard_counts)
    per_rank = start_processes(
        bench_process, most + WORKERS, sizes, shard_counts, quick, part, rounds
    )
    workers = [per_rank[r] for r in range(most, most + WORKERS)]
    tag = suffix(quick)
    rows = capacity_rows(workers)
    allreduce = allreduce_rows(workers)
    if rows:
        write_csv(args.out / f"scaling{tag}.csv", rows)
    if allreduce:
        write_csv(args.out / f"scaling_allreduce{tag}.csv", allreduce)
    if part == "all":
        write_json(
            args.out / f"scaling{tag}.json",
            {"workers": WORKERS, "capacity": rows, "allreduce_vs_periodic_averager": allreduce},
        )
    else:  # one part rerun: replace its figures in the JSON, keep the other part's
        path = args.out / f"scaling{tag}.json"
        kept = json.loads(path.read_text()) if path.exists() else {}
        kept.pop("machine", None)
        if part == "capacity":
            kept["capacity"] = rows
        else:
            kept["allreduce_vs_periodic_averager"] = allreduce
        write_json(path, {"workers": WORKERS, **kept})
    if rows:
        print(f"{'k':>2s} {'params':>9s} {'rtt ms':>9s} {'exch/s':>8s} {'MB/s':>8s} {'vs k=1':>6s}")
    for r in rows:
        print(f"{r['shards']:2d} {r['params']:9.0e} {r['mean_rtt_ms']:9.2f} {r['exchanges_per_s']:8.1f} "
              f"{r['center_MB_per_s']:8.0f} {r['ratio_to_one_shard']:6.2f}")  # fmt: skip
    for r in allreduce:
        print(f"straggler x{r['straggler_slowdown']:.0f}: PeriodicModelAverager "
              f"{r['periodic_averager_steps_per_s']:.1f} steps/s")  # fmt: skip
        for name in OURS:
            prefix = "" if name == "easgd" else f"{name}_"
            print(f"  {name} all-reduce {r[f'{name}_allreduce_steps_per_s']:.1f} steps/s, "
                  f"ratio {r[f'ratio_{name}_over_averager']:.3f}; per round "
                  f"{r[f'{prefix}ratio_per_round']}, median {r[f'{prefix}ratio_median']:.3f}")  # fmt: skip
    if rows and not quick:
        plot(rows, args.out / "scaling.png")


def plot(rows: list[dict[str, Any]], path: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for params in sorted({r["params"] for r in rows}):
        mine = [r for r in rows if r["params"] == params]
        ax.plot([r["shards"] for r in mine], [r["center_MB_per_s"] for r in mine], "o-",
                label=f"{params / 1e6:g}M parameters")  # fmt: skip
    ax.set_xlabel("shards k")
    ax.set_ylabel("MB/s through the center (2 x model per exchange)")
    ax.set_xticks(sorted({r["shards"] for r in rows}))
    ax.set_title(f"{WORKERS} workers exchanging back to back, one 2-core machine")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
