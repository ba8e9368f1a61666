"""The run summary (summary.json) and the TensorBoard hparams entry, the same for every algorithm."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from easgd.config.schema import TrainConfig, to_dict
from easgd.runtime.runlog import RunLog

if TYPE_CHECKING:
    from easgd.runtime.server import ParameterServer, ServerOutcome

log = logging.getLogger("easgd")


def build_summary(
    cfg: TrainConfig,
    *,
    num_params: int,
    wall_time_s: float,
    exchanges: int,
    server_updates: int,
    worker_steps: int,
    test_loss: float,
    test_error: float,
    stop_reason: str,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    workers = cfg.workers if cfg.algorithm.uses_server else 1
    return {
        "algorithm": cfg.algorithm.name,
        "workers": workers,
        "comm_period": cfg.comm.period if cfg.algorithm.uses_server else None,
        "steps_per_worker": cfg.steps_per_worker,
        "worker_steps": worker_steps,
        "exchanges": exchanges,
        "server_updates": server_updates,
        "exchanges_per_s": exchanges / max(wall_time_s, 1e-9),
        "wall_time_s": wall_time_s,
        "test_error": test_error,
        "test_loss": test_loss,
        "stop_reason": stop_reason,
        "learning_rate": cfg.algorithm.learning_rate,
        "momentum": cfg.algorithm.momentum,
        "moving_rate": cfg.algorithm.resolved_moving_rate(workers)
        if cfg.algorithm.elastic
        else None,
        "dataset": cfg.data.name,
        "model": cfg.model.name,
        "num_params": num_params,
        "latency_ms": cfg.comm.latency_ms,
        "jitter_ms": cfg.comm.jitter_ms,
        "seed": cfg.seed,
        "config": to_dict(cfg),
        **(extra or {}),
    }


def build_hparams(cfg: TrainConfig) -> dict[str, Any]:
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


def finish_run(runlog: RunLog, cfg: TrainConfig, summary: dict[str, Any]) -> Path:
    """Record the HParams entry with the final test figures and write summary.json (its path)."""
    final = {"test_error": summary["test_error"], "test_loss": summary["test_loss"]}
    runlog.hparams(build_hparams(cfg), final)
    return runlog.summary(summary)


def server_summary(
    cfg: TrainConfig,
    outcome: ServerOutcome,
    server: ParameterServer,
    *,
    num_params: int,
    restarts: int,
    committed_snapshot: int | None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The summary of a parameter-server run (one server or shard 0 of a sharded center)."""
    return build_summary(
        cfg,
        num_params=num_params,
        wall_time_s=outcome.wall_time_s,
        exchanges=outcome.exchanges,
        server_updates=outcome.server_updates,
        worker_steps=outcome.worker_steps,
        test_loss=outcome.test_loss,
        test_error=outcome.test_error,
        stop_reason=outcome.stop_reason,
        extra={
            "rejected_messages": outcome.rejected,
            "failed_workers": {str(r): why for r, why in outcome.failed_workers.items()},
            "restarts": restarts,
            "resumed_worker_steps": {str(r): s for r, s in server.resumed_steps.items()},
            "worker_steps_per_s": {str(r): s.steps_per_s for r, s in server.stats.items()},
            "redone_worker_steps": sum(s.redone_steps for s in server.stats.values()),
            "redone_steps_by_worker": {str(r): s.redone_steps for r, s in server.stats.items()},
            "committed_snapshot": committed_snapshot,
            **(extra or {}),
        },
    )


def log_done(summary: dict[str, Any], path: Path) -> None:
    """The run's last log line: time, the evaluated variable's test error, exchanges."""
    log.info(
        "done in %.1f s: center test error %.2f%%, %d exchanges (%.0f/s); summary in %s",
        summary["wall_time_s"],
        100 * summary["test_error"],
        summary["exchanges"],
        summary["exchanges_per_s"],
        path,
    )
