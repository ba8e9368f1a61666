"""summary.json: one documented shape for every topology and mode, and the TensorBoard hparams entry.

Every way of running (the parameter server, a sharded center, all-reduce, a sequential
baseline, ``mode=simulate`` and the own-loop ``api.serve``) ends by writing one :class:`Summary`.
The top-level keys are the same everywhere (``schema`` says which version of this shape the file
has); what only one topology knows sits under ``details``:

- ``server`` (one server or ``server.shards`` = k): ``shards``, ``rejected_messages``,
  ``worker_steps_per_s``, ``redone_worker_steps``, ``redone_steps_by_worker``,
  ``committed_snapshot``;
- ``allreduce``: ``steps_per_s_rank0``, ``mean_allreduce_ms``, ``resumed_step``;
- ``sequential``: ``train_loss``, ``train_error`` of the final point;
- ``mode=simulate`` (any topology it simulates): ``clock``, ``cost_profile``, ``step_time_s``,
  ``link_latency_s``, ``bandwidth_gbps``, ``service_s``, ``charges_in_steps``, ``simulation_s``;
- ``own_loop``: the server's details, and ``hparams`` (what the user passed to ``api.serve``).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from easgd.config.schema import TrainConfig, to_dict
from easgd.parts.runlog import RunLog

log = logging.getLogger("easgd")

SCHEMA_VERSION = 2
"""Version of the summary.json shape (1: the shapes before one Summary; 2: this one)."""


HYPERPARAMETERS: tuple[str, ...] = ("learning_rate", "momentum", "moving_rate", "dataset")
HYPERPARAMETERS += ("model", "latency_ms", "jitter_ms", "seed")
"""The hyperparameter keys of every summary (null where a run does not know one: the own-loop API
knows the moving rate, not the user's learning rate)."""


@dataclass
class RunFigures:
    """What a run measured, whichever topology ran it."""

    wall_time_s: float
    """Seconds from the start of training to its end (virtual seconds with mode=simulate)."""
    worker_steps: int
    """Local steps taken by all workers together."""
    exchanges: int
    """Worker-center exchanges applied (every worker's, all-reduce: p per round)."""
    server_updates: int
    """Updates of the center (all-reduce: rounds)."""
    test_loss: float
    test_error: float
    """The evaluated variable's (center, z, or the sequential point's) final test figures."""
    stop_reason: str
    """steps, max_wall_s, target_test_error, worker_failure or interrupted."""


@dataclass
class Summary:
    """The record of one finished run: ``summary.json``."""

    topology: str
    """server, allreduce, sequential or own_loop (see the module docstring)."""
    mode: str
    """distributed (real processes, wall-clock time) or simulate (the virtual clock)."""
    algorithm: str
    workers: int
    """p, the worker count (1 for a sequential baseline)."""
    comm_period: int | None
    """tau (None for a sequential baseline)."""
    steps_per_worker: int | None
    """The step budget per worker (None where the run has none: the own-loop API)."""
    num_params: int
    figures: RunFigures
    restarts: int = 0
    """How many times the job was restarted and resumed from a checkpoint."""
    resumed_worker_steps: dict[str, int] = field(default_factory=dict)
    """Each worker's step counter when this attempt started (worker rank -> step)."""
    resumed_exchanges: int = 0
    """Exchanges made before this attempt started (exchanges_per_s counts only this attempt's)."""
    failed_workers: dict[str, str] = field(default_factory=dict)
    """Workers that failed or were lost, with the reason (worker rank -> reason)."""
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    """learning_rate, momentum, moving_rate, dataset, model, latency_ms, jitter_ms, seed."""
    config: dict[str, Any] | None = None
    """The full validated config (None for the own-loop API, which has none)."""
    details: dict[str, Any] = field(default_factory=dict)
    """What only this topology or mode knows (see the module docstring)."""

    def to_dict(self) -> dict[str, Any]:
        """The flat JSON object written to summary.json (figures and hyperparameters inlined)."""
        record = asdict(self)
        figures = record.pop("figures")
        known = record.pop("hyperparameters")
        unknown = set(known) - set(HYPERPARAMETERS)
        if unknown:
            raise ValueError(f"Summary.hyperparameters has unknown keys {sorted(unknown)}")
        hyperparameters = {key: known.get(key) for key in HYPERPARAMETERS}
        return {
            "schema": SCHEMA_VERSION,
            **record,
            **figures,
            **hyperparameters,
            "exchanges_per_s": (figures["exchanges"] - self.resumed_exchanges)
            / max(figures["wall_time_s"], 1e-9),
        }

    @classmethod
    def of_run(
        cls,
        cfg: TrainConfig,
        figures: RunFigures,
        *,
        topology: str,
        num_params: int,
        restarts: int = 0,
        resumed_worker_steps: dict[str, int] | None = None,
        resumed_exchanges: int = 0,
        failed_workers: dict[str, str] | None = None,
        details: dict[str, Any] | None = None,
    ) -> Summary:
        """The summary of a run of ``cfg`` (easgd.train, any topology or mode)."""
        distributed = cfg.algorithm.uses_server
        workers = cfg.workers if distributed else 1
        moving_rate = cfg.algorithm.resolved_moving_rate(workers) if cfg.algorithm.elastic else None
        return cls(
            topology=topology,
            mode=cfg.mode,
            algorithm=cfg.algorithm.name,
            workers=workers,
            comm_period=cfg.comm.period if distributed else None,
            steps_per_worker=cfg.steps_per_worker,
            num_params=num_params,
            figures=figures,
            restarts=restarts,
            resumed_worker_steps=resumed_worker_steps or {},
            resumed_exchanges=resumed_exchanges,
            failed_workers=failed_workers or {},
            hyperparameters={
                "learning_rate": cfg.algorithm.learning_rate,
                "momentum": cfg.algorithm.momentum,
                "moving_rate": moving_rate,
                "dataset": cfg.data.name,
                "model": cfg.model.name,
                "latency_ms": cfg.comm.latency_ms,
                "jitter_ms": cfg.comm.jitter_ms,
                "seed": cfg.seed,
            },
            config=to_dict(cfg),
            details=details or {},
        )


def hparams_of(cfg: TrainConfig) -> dict[str, Any]:
    """The TensorBoard HParams entry of a run of ``cfg``."""
    return {
        "algorithm": cfg.algorithm.name,
        "workers": cfg.workers,
        "comm_period": cfg.comm.period,
        "learning_rate": cfg.algorithm.learning_rate,
        "momentum": cfg.algorithm.momentum,
        "beta": cfg.algorithm.beta,
        "latency_ms": cfg.comm.latency_ms,
        "dataset": cfg.data.name,
        "model": cfg.model.name,
    }


def write_summary(runlog: RunLog, summary: Summary, hparams: dict[str, Any]) -> dict[str, Any]:
    """Record the HParams entry with the final figures, write summary.json, log the last line;
    returns the JSON object written."""
    record = summary.to_dict()
    runlog.hparams(hparams, {"test_error": record["test_error"], "test_loss": record["test_loss"]})
    path = runlog.summary(record)
    log_done(record, path)
    return record


def log_done(summary: dict[str, Any], path: Path | None) -> None:
    """The run's last log line: time, the evaluated variable's test error, exchanges."""
    clock = "virtual s" if summary["mode"] == "simulate" else "s"
    evaluated = "test error" if summary["topology"] == "sequential" else "center test error"
    where = f"; summary in {path}" if path is not None else ""
    log.info(
        "done in %.1f %s: %s %.2f%%, %d exchanges (%.0f/s)%s",
        summary["wall_time_s"],
        clock,
        evaluated,
        100 * summary["test_error"],
        summary["exchanges"],
        summary["exchanges_per_s"],
        where,
    )
