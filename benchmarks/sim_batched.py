"""The simulator's batched path against its one-call-per-step path: simulated worker steps per second.

For the MNIST-1D CNN (``cnn1d``, ~5k parameters) and an MLP (40-100-100-10, ~15k parameters),
minibatch 128, at p = 4, 16 and 64 workers: EAMSGD (tau = 10, delta = 0.9) on the asynchronous
schedule, free exchanges, every worker at speed 1 (so each batched call takes all p workers).
The two paths (``sim.batched=false`` and ``true``) run interleaved, in alternating order, in
several rounds of the same number of steps from the same seed; a rate is the best round's (the
least disturbed by other work on a shared machine), the ratio is best over best, with the median
of the per-round ratios beside it. Targets (issue 21): >= 5x at p = 16, >= 10x at p = 64. Each
round also checks that the two paths ended at the same workers (float32: to rounding).

    python benchmarks/sim_batched.py                 # full (~3 min of CPU, one thread)
    python benchmarks/sim_batched.py --quick         # one short round of each (< 1 min)
    python benchmarks/sim_batched.py --device cuda   # the same on a GPU
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from _claims import mnist1d_objective  # noqa: E402
from _common import one_thread_cli, suffix, write_csv, write_json  # noqa: E402

from easgd.config.algorithm import AlgorithmConfig  # noqa: E402
from easgd.sim import ClassifierObjective, SimConfig, Simulator  # noqa: E402

WORKERS = (4, 16, 64)
TARGETS = {16: 5.0, 64: 10.0}
MODELS = ("cnn1d", "mlp")
ALGORITHM = AlgorithmConfig("eamsgd", learning_rate=0.01, momentum=0.9)


def objective_on(model: str, device: str) -> ClassifierObjective:
    objective = mnist1d_objective(model, hidden=(100, 100), seed=0)
    if device != "cpu":  # the module's flat buffer, the data: all on the device
        objective.flat.module.to(device)
        split = objective.split
        objective = ClassifierObjective(
            objective.flat.module,
            type(split)(
                split.name, split.train_x.to(device), split.train_y.to(device),
                split.test_x.to(device), split.test_y.to(device), split.num_classes,
            ),
            batch_size=objective.batch_size,
        )  # fmt: skip
    return objective


def timed_run(
    objective: ClassifierObjective, workers: int, steps: int, batched: str, device: str
) -> tuple[float, list[torch.Tensor], int]:
    """Seconds of one run of ``steps`` per worker (evaluations only at its start and end), its
    final workers, and its batched calls."""
    sim = SimConfig(
        num_workers=workers, comm_period=10, duration=math.inf, eval_interval=math.inf,
        steps_per_worker=steps, seed=0, batched=batched,
    )  # fmt: skip
    simulator = Simulator(ALGORITHM, sim, objective)
    if device != "cpu":
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = simulator.run()
    if device != "cpu":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    assert result.steps == workers * steps
    calls = simulator.batch.calls if simulator.batch is not None else 0
    return seconds, result.workers, calls


def measure(model: str, workers: int, steps: int, rounds: int, device: str) -> dict[str, Any]:
    """Interleaved rounds of the two paths for one (model, p)."""
    objective = objective_on(model, device)
    timed_run(objective, workers, 2, "false", device)  # warm-up (first calls, allocations)
    timed_run(objective, workers, 2, "true", device)
    best = {"false": math.inf, "true": math.inf}
    ratios, difference, calls = [], 0.0, 0
    for index in range(rounds):
        order = ("false", "true") if index % 2 == 0 else ("true", "false")
        seconds, ends = {}, {}
        for batched in order:
            seconds[batched], ends[batched], made = timed_run(
                objective, workers, steps, batched, device
            )
            best[batched] = min(best[batched], seconds[batched])
            calls = made or calls
        ratios.append(seconds["false"] / seconds["true"])
        difference = max(
            difference,
            max(
                float((a - b).abs().max()) for a, b in zip(ends["true"], ends["false"], strict=True)
            ),
        )
    total = workers * steps
    return {
        "model": model,
        "params": objective.flat.num_params,
        "p": workers,
        "steps_per_worker": steps,
        "rounds": rounds,
        "per_worker_steps_per_s": total / best["false"],
        "batched_steps_per_s": total / best["true"],
        "ratio": best["false"] / best["true"],
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "mean_batch": total / calls if calls else float("nan"),
        "target": TARGETS.get(workers),
        "max_worker_difference": difference,
    }


def plot(rows: list[dict[str, Any]], path: str, device: str) -> None:
    fig, axes = plt.subplots(1, len(MODELS), figsize=(9, 3.6), sharey=True)
    for ax, model in zip(axes, MODELS, strict=True):
        mine = [r for r in rows if r["model"] == model]
        x = range(len(mine))
        ax.bar(
            [i - 0.2 for i in x],
            [r["per_worker_steps_per_s"] for r in mine],
            0.4,
            label="per worker (sim.batched=false)",
            color="tab:gray",
        )
        ax.bar([i + 0.2 for i in x], [r["batched_steps_per_s"] for r in mine], 0.4,
               label="batched (sim.batched=true)", color="tab:blue")  # fmt: skip
        for i, r in zip(x, mine, strict=True):
            top = max(r["per_worker_steps_per_s"], r["batched_steps_per_s"])
            target = f"\n(target {r['target']:g}x)" if r["target"] else ""
            ax.text(i, top * 1.03, f"{r['ratio']:.2f}x{target}", ha="center", fontsize=8)
        ax.set_xticks(list(x), [f"p={r['p']}" for r in mine])
        ax.set_title(f"{model} ({mine[0]['params']:,} params)", fontsize=10)
        ax.set_ylim(0, 1.35 * max(max(r["per_worker_steps_per_s"], r["batched_steps_per_s"])
                                  for r in rows))  # fmt: skip
    axes[0].set_ylabel("simulated worker steps / s")
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle(f"Simulator throughput, batch 128, EAMSGD tau=10, {device}, 1 thread", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    args = one_thread_cli(__doc__ or "")
    quick, device = args.quick, args.device
    # worker steps per round: about the same total work at every p
    steps = {4: 6, 16: 2, 64: 1} if quick else {4: 64, 16: 16, 64: 5}
    rounds = 1 if quick else 6
    rows = [measure(m, p, steps[p], rounds, device) for m in MODELS for p in WORKERS]
    tag = suffix(quick) + ("" if device == "cpu" else "_" + device.replace(":", ""))
    write_csv(args.out / f"sim_batched{tag}.csv", rows)
    write_json(
        args.out / f"sim_batched{tag}.json",
        {"device": device, "threads": 1, "batch": 128, "algorithm": "eamsgd tau=10",
         "targets": TARGETS, "rows": rows},
    )  # fmt: skip
    plot(rows, str(args.out / f"sim_batched{tag}.png"), device)
    print(f"{'model':6s} {'p':>3s} {'per-worker/s':>12s} {'batched/s':>10s} {'ratio':>6s} "
          f"{'[min, max]':>14s} {'batch':>5s} target")  # fmt: skip
    for r in rows:
        target = f">= {r['target']:g}x" if r["target"] else ""
        print(f"{r['model']:6s} {r['p']:3d} {r['per_worker_steps_per_s']:12.0f} "
              f"{r['batched_steps_per_s']:10.0f} {r['ratio']:6.2f} "
              f"[{r['ratio_min']:.2f}, {r['ratio_max']:.2f}] {r['mean_batch']:5.1f} {target}")  # fmt: skip
    print("ratio = best round / best round; [min, max] over the rounds' own ratios")


if __name__ == "__main__":
    main()
