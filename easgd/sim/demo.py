"""Simulated comparison on the digits dataset: EAMSGD, EASGD, DOWNPOUR (p = 4) and MSGD (p = 1).

Runs in a few seconds on one CPU core and prints the evaluated variable's test error against
virtual time (one time unit = one step of one worker; the p = 4 methods take 4 steps per unit).

    python -m easgd.sim.demo                 # the table
    python -m easgd.sim.demo --duration 800 --seed 1 --csv sim.csv
"""

from __future__ import annotations

import argparse
import csv
import time
from dataclasses import dataclass

import torch

from easgd.config.algorithm import AlgorithmConfig
from easgd.data import load_digits_split
from easgd.models import MLP
from easgd.sim import ClassifierObjective, SimConfig, SimResult, simulate


@dataclass(frozen=True)
class Contender:
    """One line of the comparison."""

    label: str
    algorithm: AlgorithmConfig
    num_workers: int
    comm_period: int


CONTENDERS = (
    Contender("EAMSGD tau=10", AlgorithmConfig("eamsgd", learning_rate=0.05, momentum=0.9), 4, 10),
    Contender("EASGD tau=10", AlgorithmConfig("easgd", learning_rate=0.1), 4, 10),
    Contender("DOWNPOUR tau=1", AlgorithmConfig("downpour", learning_rate=0.05), 4, 1),
    Contender("MSGD p=1", AlgorithmConfig("msgd", learning_rate=0.05, momentum=0.9), 1, 1),
)


def run_contender(
    contender: Contender, *, duration: float, eval_interval: float, seed: int, hidden: int
) -> SimResult:
    """Simulate one contender from the same initial weights (seeded) and the same data split."""
    split = load_digits_split(seed=0)
    torch.manual_seed(seed)
    objective = ClassifierObjective(MLP(split.input_shape, split.num_classes, (hidden,)), split)
    sim = SimConfig(
        num_workers=contender.num_workers,
        comm_period=contender.comm_period,
        duration=duration,
        eval_interval=eval_interval,
        seed=seed,
    )
    return simulate(contender.algorithm, sim, objective)


def format_table(results: dict[str, SimResult]) -> str:
    """Markdown table: one row per method, one column per evaluation time (test error in %)."""
    times = [point.time for point in next(iter(results.values())).history]
    header = "| method | " + " | ".join(f"t={t:g}" for t in times) + " | exchanges |"
    rule = "|---" * (len(times) + 2) + "|"
    rows = [
        f"| {label} | "
        + " | ".join(f"{100 * p.test_error:.1f}" for p in result.history)
        + f" | {result.exchanges} |"
        for label, result in results.items()
    ]
    return "\n".join([header, rule, *rows])


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (``easgd-sim``)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--duration", type=float, default=400.0, help="virtual time units (default 400)"
    )
    parser.add_argument(
        "--eval-interval", type=float, default=50.0, help="time between evaluations"
    )
    parser.add_argument("--seed", type=int, default=0, help="initial weights and minibatch seed")
    parser.add_argument("--hidden", type=int, default=128, help="MLP hidden width")
    parser.add_argument("--csv", default=None, help="also write the curves to this CSV file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    results: dict[str, SimResult] = {}
    started = time.perf_counter()
    for contender in CONTENDERS:
        results[contender.label] = run_contender(
            contender,
            duration=args.duration,
            eval_interval=args.eval_interval,
            seed=args.seed,
            hidden=args.hidden,
        )
    elapsed = time.perf_counter() - started
    print("Center test error (%) on digits against virtual time (simulated, p = 4 unless noted)\n")
    print(format_table(results))
    print(f"\n{elapsed:.1f} s wall-clock for all runs")
    if args.csv:
        with open(args.csv, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["method", "time", "steps", "exchanges", "test_loss", "test_error"])
            for label, result in results.items():
                for p in result.history:
                    writer.writerow(
                        [label, p.time, p.steps, p.exchanges, p.test_loss, p.test_error]
                    )


if __name__ == "__main__":
    main()
