"""System overhead of EAMSGD's exchanges, against no communication and against PyTorch's own
all-reduce model averaging (PeriodicModelAverager), with and without a 3x straggler.

A ~1M-parameter MLP (256 -> 1024 -> 704 -> 10) on the synthetic task, p = 4 workers, minibatch 128.
Every figure is a worker's own step rate (steps/s over its loop), and every ratio compares runs
made side by side in this one invocation. "No communication" is the same runtime with a period
longer than the run (one exchange at t = 0).

    python benchmarks/overhead.py            # full: tau in {1, 4, 10, 64}, 400 steps per run
    python benchmarks/overhead.py --quick    # tau = 10 only, 60 steps per run (< 1 min)

Note: this machine has 2 cores shared by 4 workers (+ the server), so a sleeping straggler frees CPU
for the others; on one GPU per worker the effect would be smaller.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
import torch.distributed as dist
from _common import parser, suffix, write_csv, write_json

from easgd.config.algorithm import AlgorithmConfig
from easgd.config.schema import CommConfig, DataConfig, ModelConfig, TrainConfig
from easgd.data.sampling import MinibatchSampler
from easgd.flat import FlatModel
from easgd.runtime.components import build_model, build_split
from easgd.runtime.launcher import launch, start_processes

WORKERS = 4
DATA = DataConfig(name="synthetic", num_features=256, num_samples=4000, batch_size=128)
MODEL = ModelConfig(name="mlp", hidden=[1024, 704])


def easgd_rates(
    period: int, steps: int, *, overlap: bool = False, straggler: bool = False
) -> list[float]:
    """Per-worker step rates of one EAMSGD run (worker 1 slowed 3x when ``straggler``)."""
    cfg = TrainConfig(
        algorithm=AlgorithmConfig("eamsgd", learning_rate=0.01, momentum=0.99),
        data=DATA, model=MODEL, workers=WORKERS, steps_per_worker=steps, eval_interval_s=30.0,
        progress=False, tensorboard=False, run_dir=f"/tmp/easgd-overhead-{os.getpid()}-{period}-{overlap}-{straggler}",
        comm=CommConfig(period=period, overlap=overlap, slowdown=[3.0, 1.0, 1.0, 1.0] if straggler else []),
    )  # fmt: skip
    cfg.checkpoint.every_s = 0.0
    cfg.checkpoint.resume = False  # every run here starts fresh, even in a reused folder
    summary = launch(cfg)
    assert summary is not None
    return [summary["worker_steps_per_s"][str(r)] for r in range(1, WORKERS + 1)]


def averager_worker(period: int, steps: int, straggler: bool) -> float:
    """One process of all-reduce local SGD with torch's PeriodicModelAverager; returns steps/s."""
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    split = build_split(DATA)
    model = build_model(MODEL, split, seed=0)
    flat = FlatModel(model)
    sampler = MinibatchSampler(
        split, batch_size=DATA.batch_size, worker_index=rank, num_workers=WORKERS, seed=0
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    averager = PeriodicModelAverager(period=period, warmup_steps=0)
    slow = straggler and rank == 0
    dist.barrier()
    started = time.perf_counter()
    for _ in range(steps):
        step_started = time.perf_counter()
        inputs, targets = sampler.sample()
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
        averager.average_parameters(model.parameters())
        if slow:
            time.sleep(2.0 * (time.perf_counter() - step_started))
    rate = steps / (time.perf_counter() - started)
    dist.destroy_process_group()
    del flat
    return rate


def averager_rates(period: int, steps: int, *, straggler: bool = False) -> list[float]:
    results = start_processes(averager_worker, WORKERS, period, steps, straggler)
    return [results[r] for r in range(WORKERS)]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def main() -> None:
    args = parser(__doc__ or "").parse_args()
    quick = args.quick
    steps = 40 if quick else 400
    periods = (10,) if quick else (1, 4, 10, 64)

    def row(run: str, tau: int | None, rates: list[float]) -> dict[str, Any]:
        return {
            "run": run,
            "tau": tau,
            "mean_steps_per_s": mean(rates),
            "ratio_to_no_comm": mean(rates) / mean(baseline),
            "_rates": rates,
        }

    baseline = easgd_rates(steps + 1, steps)
    rows = [row("easgd no communication", None, baseline)]
    rows += [row("easgd", tau, easgd_rates(tau, steps)) for tau in periods]
    rows.append(row("easgd overlap", 10, easgd_rates(10, steps, overlap=True)))
    rows += [row("PeriodicModelAverager", tau, averager_rates(tau, steps)) for tau in periods]

    # stragglers: worker 1 (EASGD) / rank 0 (all-reduce) 3x slower; the others' rates against the
    # tau = 10 runs above (per worker, so the same workers are compared)
    easgd_fast = next(r for r in rows if r["run"] == "easgd" and r["tau"] == 10)["_rates"]
    avg_fast = next(r for r in rows if r["run"] == "PeriodicModelAverager" and r["tau"] == 10)[
        "_rates"
    ]
    easgd_straggling = easgd_rates(10, steps, straggler=True)
    avg_straggling = averager_rates(10, steps, straggler=True)
    straggler = {
        "easgd_others_rate_ratio": mean(easgd_straggling[1:]) / mean(easgd_fast[1:]),
        "easgd_straggler_rate_ratio": easgd_straggling[0] / easgd_fast[0],
        "allreduce_others_rate_ratio": mean(avg_straggling[1:]) / mean(avg_fast[1:]),
        "allreduce_straggler_rate_ratio": avg_straggling[0] / avg_fast[0],
    }
    rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    tag = suffix(quick)
    write_csv(args.out / f"overhead{tag}.csv", rows)
    write_json(
        args.out / f"overhead{tag}.json",
        {
            "steps_per_run": steps,
            "workers": WORKERS,
            "params": sum(
                p.numel() for p in build_model(MODEL, build_split(DATA), seed=0).parameters()
            ),
            "runs": rows,
            "straggler_3x": straggler,
        },
    )
    print(f"{'run':28s} {'tau':>4s} {'steps/s':>9s} {'ratio to no-comm':>17s}")
    for r in rows:
        print(
            f"{r['run']:28s} {str(r['tau'] or '-'):>4s} {r['mean_steps_per_s']:9.2f} {r['ratio_to_no_comm']:17.3f}"
        )
    print("straggler (one worker 3x slower, tau=10): rate of the others relative to no straggler")
    for key, value in straggler.items():
        print(f"  {key}: {value:.3f}")


if __name__ == "__main__":
    main()
