"""The run summary (summary.json) and the TensorBoard hparams entry, the same for every algorithm."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from easgd.config.schema import TrainConfig, to_dict
from easgd.runtime.runlog import RunLog


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
        if cfg.algorithm.name in ("easgd", "eamsgd")
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
