"""Shared by the claims benchmarks (momentum, flat_minima, spread): a resumable per-run cache, a
time-boxed parallel map over runs, the MNIST-1D objective, and the result files they all write.

Every finished run is appended as one JSON line to a cache file next to the results, so a full
benchmark can be run in chunks (``--max-minutes``) and resumed: runs already in the cache are
never repeated, and the figures are computed once the cache holds every run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import torch
from _common import parser, write_csv, write_json
from matplotlib.figure import Figure

from easgd.config.schema import DataConfig, ModelConfig
from easgd.data.split import Split
from easgd.parts.build import build_model, build_split
from easgd.sim import ClassifierObjective

Task = tuple[str, dict[str, Any]]
"""(cache key, keyword arguments of the run function)."""


def load_cache(path: Path) -> dict[str, dict[str, Any]]:
    """Every run recorded in ``path`` (a JSON-lines file), by key; a torn last line is ignored."""
    records: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            records[record["key"]] = record
    return records


def _init_worker() -> None:
    torch.set_num_threads(1)


def _call(job: tuple[Callable[..., dict[str, Any]], str, dict[str, Any]]) -> dict[str, Any]:
    fn, key, kwargs = job
    return {"key": key, **fn(**kwargs)}


def run_cached(
    fn: Callable[..., dict[str, Any]],
    tasks: Sequence[Task],
    *,
    cache: Path,
    jobs: int = 1,
    deadline: float | None = None,
) -> tuple[dict[str, dict[str, Any]], bool]:
    """Run every task not yet in ``cache`` (``jobs`` processes), appending each result as it ends.

    Stops starting runs once ``time.monotonic()`` passes ``deadline`` (a run in progress is
    abandoned, not recorded). Returns (every cached record, whether all ``tasks`` are now done).
    """
    cache.parent.mkdir(parents=True, exist_ok=True)
    done = load_cache(cache)
    todo = [(fn, key, kwargs) for key, kwargs in tasks if key not in done]
    if todo:
        print(f"{len(todo)} runs to do ({len(tasks) - len(todo)} cached) with {jobs} process(es)")

    def record(result: dict[str, Any]) -> None:
        done[result["key"]] = result
        with open(cache, "a") as handle:
            handle.write(json.dumps(result) + "\n")

    def out_of_time() -> bool:
        return deadline is not None and time.monotonic() > deadline

    if jobs <= 1:
        _init_worker()
        for job in todo:
            if out_of_time():
                break
            record(_call(job))
    elif todo:
        with mp.get_context("spawn").Pool(jobs, initializer=_init_worker) as pool:
            for result in pool.imap_unordered(_call, todo):
                record(result)
                if out_of_time():
                    pool.terminate()
                    break
    complete = all(key in done for key, _ in tasks)
    if not complete:
        missing = sum(key not in done for key, _ in tasks)
        print(f"time box reached: {missing} runs left; run the same command again to resume")
    return done, complete


@lru_cache(maxsize=4)
def mnist1d_split(train_subset: int | None = None) -> Split:
    """The standard MNIST-1D split (4,000 train / 1,000 test), optionally a training subset."""
    return build_split(DataConfig(name="mnist1d", train_subset=train_subset))


def mnist1d_objective(
    model: str, *, hidden: Sequence[int] = (100, 100), seed: int, train_subset: int | None = None
) -> ClassifierObjective:
    """A simulator objective on MNIST-1D: ``mlp`` (``hidden`` widths) or ``cnn1d``, init ``seed``."""
    split = mnist1d_split(train_subset)
    config = ModelConfig(name=model, hidden=list(hidden))
    return ClassifierObjective(build_model(config, split, seed=seed), split, batch_size=128)


def claims_parser(description: str) -> argparse.ArgumentParser:
    """The benchmarks' --quick and --out, plus --jobs and --max-minutes for running a full
    benchmark in resumable chunks."""
    p = parser(description)
    p.add_argument("--jobs", type=int, default=1, help="parallel processes (default 1)")
    p.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="stop starting runs after this long; rerun the command to resume from the cache",
    )
    return p


def deadline_of(max_minutes: float | None) -> float | None:
    """The ``time.monotonic()`` after which ``run_cached`` starts no runs (None: no time box)."""
    return None if max_minutes is None else time.monotonic() + 60 * max_minutes


def write_results(
    out: Path,
    tag: str,
    *,
    table: str,
    rows: list[dict[str, Any]],
    summary: dict[str, Any],
    figure: Figure,
) -> None:
    """Print the markdown ``table`` and write ``<tag>.csv`` (``rows``), ``<tag>.md`` (``table``),
    ``<tag>.json`` (``summary`` with the machine description) and ``<tag>.png`` (``figure``,
    closed afterwards)."""
    print(table)
    write_csv(out / f"{tag}.csv", rows)
    (out / f"{tag}.md").write_text(table)
    write_json(out / f"{tag}.json", summary)
    figure.savefig(out / f"{tag}.png", dpi=110)
    plt.close(figure)
