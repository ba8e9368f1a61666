"""The server side of the own-loop API: the runtime's ParameterServer around a user's model.

``serve(model, session)`` holds the center (initialised from ``model``'s trainable parameters),
serves every worker with :class:`~easgd.runtime.server.ParameterServer` and supervises the run with
:class:`~easgd.runtime.supervisor.Supervisor` (the classes ``easgd.train`` uses: divergence guard,
heartbeats, stop rules, run log), evaluates the center with the user's
callback, and writes metrics.csv, TensorBoard events and summary.json into ``run_dir``. With a
``run_dir`` it takes consistent snapshots of the whole run with ``easgd.train``'s marker cut and
writer (:mod:`easgd.runtime.snapshot`; the workers' side is :mod:`easgd.api.snapshots`), and after
a torchrun restart every rank resumes from the newest committed one.

Buffers (BatchNorm running statistics) are not averaged: each worker keeps its own, and the center
has none. ``evaluate(model)`` receives the model holding the center's parameters and its own
buffers; recompute them there for the center (as for any averaged weights, e.g. with
``torch.optim.swa_utils.update_bn(batches, model)``) before measuring.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from easgd.algorithms.registry import spec_of
from easgd.api.optimizer import trainable_params
from easgd.api.roles import ModelParams
from easgd.api.session import Session
from easgd.api.snapshots import run_description
from easgd.comm.groups import LaunchError
from easgd.comm.heartbeat import HeartbeatMonitor
from easgd.comm.transport import PairTransport
from easgd.config.algorithm import AlgorithmConfig
from easgd.roles import ServerRole, make_server_role
from easgd.runtime.checkpoint import Checkpointer
from easgd.runtime.resume import load_server_part
from easgd.runtime.runlog import RunLog
from easgd.runtime.server import ParameterServer, Resumed, ServePolicy
from easgd.runtime.snapshot import SnapshotCut, SnapshotLog, SnapshotWriter
from easgd.runtime.summary import Summary, figures_of, write_summary
from easgd.runtime.supervisor import ServerOutcome, StopRule, Supervision, Supervisor

log = logging.getLogger("easgd")

WORKER_FAILURE = ("fail_fast", "continue")

Evaluate = Callable[[nn.Module], dict[str, float]]


def _check(algorithm: str, worker_failure: str, eval_interval_s: float) -> None:
    spec_of(algorithm, key="api.serve: algorithm").check_own_loop("api.serve")
    if worker_failure not in WORKER_FAILURE:
        raise ValueError(
            f"api.serve(worker_failure={worker_failure!r}); allowed: {', '.join(WORKER_FAILURE)}"
        )
    if not eval_interval_s > 0:
        raise ValueError(f"api.serve(eval_interval_s={eval_interval_s!r}) must be > 0")


def serve(
    model: nn.Module,
    session: Session,
    *,
    algorithm: str = "easgd",
    moving_rate: float | None = None,
    average_rate: float | None = None,
    evaluate: Evaluate | None = None,
    run_dir: str | Path | None = None,
    eval_interval_s: float = 5.0,
    max_wall_s: float | None = None,
    target_test_error: float | None = None,
    checkpoint_every_s: float | None = 60.0,
    resume: bool = True,
    heartbeat_timeout_s: float = 60.0,
    worker_failure: str = "fail_fast",
    max_update_norm: float | None = None,
    tensorboard: bool = True,
    hparams: dict[str, Any] | None = None,
) -> nn.Module:
    """Rank 0: hold the center until every worker has closed; return ``model`` holding it.

    ``algorithm``: easgd or eamsgd (elastic; the workers' optimizer makes the difference),
    downpour, adownpour or mvadownpour (``average_rate`` as in easgd.train). ``moving_rate``:
    alpha, default 0.9 / p. ``evaluate(model)`` returns ``test_loss`` and ``test_error`` of the
    center (missing keys are NaN); it runs at the start, every ``eval_interval_s`` and at the end.
    ``run_dir``: metrics.csv, TensorBoard (``tensorboard``), summary.json and a consistent
    snapshot of the server and every worker every ``checkpoint_every_s`` (None or 0: only at the
    end) in ``run_dir/checkpoints``; when ``resume``, every rank resumes from the newest
    committed one (without a run_dir: nothing is written). ``hparams`` are added to summary.json
    and TensorBoard's HParams entry.
    """
    if not session.is_server:
        raise LaunchError(
            "api.serve runs on rank 0; workers wrap their optimizer in ElasticOptimizer"
        )
    _check(algorithm, worker_failure, eval_interval_s)
    config = AlgorithmConfig(name=algorithm, moving_rate=moving_rate, average_rate=average_rate)
    params = ModelParams(trainable_params(model))
    role = make_server_role(config, params.vector().cpu(), num_workers=session.num_workers)
    signature = {"algorithm": algorithm, "num_params": params.numel, "workers": session.num_workers}
    directory = Path(run_dir) / "checkpoints" if run_dir is not None else None
    resumed = _resume(role, directory, signature) if resume else _Resumed()
    session.publish_run(
        {
            "algorithm": algorithm,
            "numel": params.numel,
            "dtype": str(params.dtype),
            **run_description(directory, resumed.number, signature),
        }
    )
    transports = {
        rank: PairTransport(peer=rank, group=group, numel=params.numel, dtype=params.dtype)
        for rank, group in session.groups.items()
    }
    cut = SnapshotCut(next_number=SnapshotLog(directory).next_number()) if directory else None
    runlog = RunLog(run_dir, tensorboard=tensorboard)  # run_dir None: records nothing
    try:
        server = ParameterServer(
            role,
            transports,
            ServePolicy(worker_failure == "continue", max_update_norm=max_update_norm),
            resumed=Resumed(resumed.exchanges, frozenset(resumed.finished)),
            snapshots=cut,
        )
        heartbeat = None
        if session.store is not None:
            heartbeat = HeartbeatMonitor(
                session.store, timeout_s=heartbeat_timeout_s, first_step_s=session.timeout_s
            )
        stop_rule = StopRule(max_wall_s=max_wall_s, target_test_error=target_test_error)
        supervisor = Supervisor(
            server,
            _center_evaluator(model, params, evaluate),
            runlog,
            Supervision(eval_interval_s, stop_rule),
            heartbeat=heartbeat,
        )
        writer = _snapshot_writer(
            cut, supervisor, directory, checkpoint_every_s, resumed, signature
        )
        outcome = supervisor.run()
        if writer is not None:
            writer.finish()  # the final snapshot: every worker's part is its final state
        details = {
            "committed_snapshot": writer.committed if writer is not None else None,
            "hparams": hparams or {},
        }
        summary = _summary(algorithm, role, params.numel, server, outcome, resumed, details)
        record = {"algorithm": algorithm, "workers": session.num_workers, **(hparams or {})}
        write_summary(runlog, summary, record)
    finally:
        runlog.close()
    params.assign(role.evaluated())
    return model


def _center_evaluator(
    model: nn.Module, params: ModelParams, evaluate: Evaluate | None
) -> Callable[[Tensor], dict[str, float]]:
    """The server's evaluation: the user's callback on ``model`` holding the center."""

    def evaluate_center(center: Tensor) -> dict[str, float]:
        metrics = {"test_loss": math.nan, "test_error": math.nan}
        if evaluate is not None:
            params.assign(center)
            metrics.update({k: float(v) for k, v in evaluate(model).items()})
        return metrics

    return evaluate_center


def _snapshot_writer(
    cut: SnapshotCut | None,
    supervisor: Supervisor,
    directory: Path | None,
    every_s: float | None,
    resumed: _Resumed,
    signature: dict[str, Any],
) -> SnapshotWriter | None:
    """easgd.train's writer on the server's marker cut, ticking with the supervisor (None: no
    run_dir)."""
    if cut is None or directory is None:
        return None
    writer = SnapshotWriter(
        cut,
        supervisor,
        directory,
        every_s=every_s or 0.0,
        names=["server", *(f"worker{r}" for r in supervisor.server.transports)],
        extra={"restarts": resumed.restarts, "signature": signature},
    )
    supervisor.on_tick.append(writer.tick)
    return writer


@dataclass
class _Resumed:
    """What the server resumed from: committed snapshot ``number`` (None: a fresh start)."""

    number: int | None = None
    restarts: int = 0
    exchanges: int = 0
    finished: set[int] = field(default_factory=set)


def _resume(role: ServerRole, directory: Path | None, signature: dict[str, Any]) -> _Resumed:
    """Load the server's part of the newest committed snapshot in ``directory`` into ``role``."""
    number = SnapshotLog(directory).newest() if directory is not None else None
    state = None
    if directory is not None:
        state = load_server_part(Checkpointer(directory, "server"), number, signature)
    if state is None:
        return _Resumed()
    role.load_state_dict(state["role"])
    finished = {int(r) for r in state["finished"]}
    return _Resumed(number, int(state["restarts"]) + 1, int(state["exchanges"]), finished)


def _summary(
    algorithm: str,
    role: ServerRole,
    num_params: int,
    server: ParameterServer,
    outcome: ServerOutcome,
    resumed: _Resumed,
    details: dict[str, Any],
) -> Summary:
    """summary.json of an own-loop run (``details``: the snapshots and the user's hparams)."""
    return Summary(
        topology="own_loop",
        mode="distributed",
        algorithm=algorithm,
        workers=len(server.transports),
        comm_period=None,
        steps_per_worker=None,
        num_params=num_params,
        figures=figures_of(outcome),
        restarts=resumed.restarts,
        resumed_worker_steps={str(r): s for r, s in server.resumed_steps.items()},
        failed_workers={str(r): why for r, why in outcome.failed_workers.items()},
        hyperparameters={"moving_rate": getattr(role, "moving_rate", None)},
        details={
            "rejected_messages": outcome.rejected,
            "worker_steps_per_s": {str(r): s.steps_per_s for r, s in server.stats.items()},
            "resumed_snapshot": resumed.number,
            **details,
        },
    )
