"""The server side of the own-loop API: the runtime's ParameterServer around a user's model.

``serve(model, session)`` holds the center (initialised from ``model``'s trainable parameters),
serves every worker with :class:`~easgd.runtime.server.ParameterServer` and supervises the run with
:class:`~easgd.runtime.supervisor.Supervisor` (the classes ``easgd.train`` uses: divergence guard,
heartbeats, stop rules, run log), evaluates the center with the user's
callback, checkpoints it, resumes from the newest checkpoint after a torchrun restart, and writes
metrics.csv, TensorBoard events and summary.json into ``run_dir``.

Buffers (BatchNorm running statistics) are not averaged: each worker keeps its own, and the center
has none. ``evaluate(model)`` receives the model holding the center's parameters and its own
buffers; recompute them there for the center (as for any averaged weights, e.g. with
``torch.optim.swa_utils.update_bn(batches, model)``) before measuring.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from easgd.algorithms.registry import spec_of
from easgd.api.optimizer import trainable_params
from easgd.api.roles import ModelParams
from easgd.api.session import Session
from easgd.comm.groups import LaunchError
from easgd.comm.heartbeat import HeartbeatMonitor
from easgd.comm.transport import PairTransport
from easgd.config.algorithm import AlgorithmConfig
from easgd.roles import make_server_role
from easgd.runtime.checkpoint import Checkpointer, check_compatible
from easgd.runtime.runlog import RunLog
from easgd.runtime.server import ParameterServer, Resumed, ServePolicy
from easgd.runtime.snapshot import CheckpointPolicy
from easgd.runtime.summary import Summary, figures_of, write_summary
from easgd.runtime.supervisor import StopRule, Supervision, Supervisor

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
    ``run_dir``: metrics.csv, TensorBoard (``tensorboard``), summary.json and checkpoints every
    ``checkpoint_every_s`` and at the end, resumed from when ``resume`` (without a run_dir:
    nothing is written). ``hparams`` are added to summary.json and TensorBoard's HParams entry.
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
    checkpointer = Checkpointer(Path(run_dir) / "checkpoints", "server") if run_dir else None
    restarts, exchanges_before = 0, 0
    found = checkpointer.latest() if checkpointer is not None and resume else None
    if found is not None:
        path, state = found
        check_compatible(state, path=path, signature=signature)
        role.load_state_dict(state["role"])
        restarts, exchanges_before = int(state["restarts"]) + 1, int(state["exchanges"])
        log.info("resuming the center from %s", path)
    session.publish_run({"algorithm": algorithm, "numel": params.numel, "dtype": str(params.dtype)})
    transports = {
        rank: PairTransport(peer=rank, group=group, numel=params.numel, dtype=params.dtype)
        for rank, group in session.groups.items()
    }

    def evaluate_center(center: Tensor) -> dict[str, float]:
        metrics = {"test_loss": math.nan, "test_error": math.nan}
        if evaluate is not None:
            params.assign(center)
            metrics.update({k: float(v) for k, v in evaluate(model).items()})
        return metrics

    with tempfile.TemporaryDirectory() as scratch:
        runlog = RunLog(run_dir or scratch, tensorboard=tensorboard and run_dir is not None)
        try:
            server = ParameterServer(
                role,
                transports,
                ServePolicy(worker_failure == "continue", max_update_norm=max_update_norm),
                resumed=Resumed(exchanges_before),
            )
            stop_rule = StopRule(max_wall_s=max_wall_s, target_test_error=target_test_error)
            supervisor = Supervisor(
                server,
                evaluate_center,
                runlog,
                Supervision(eval_interval_s, stop_rule),
                heartbeat=HeartbeatMonitor(
                    session.store, timeout_s=heartbeat_timeout_s, first_step_s=session.timeout_s
                )
                if session.store is not None
                else None,
            )

            def save() -> None:
                if checkpointer is None:
                    return
                with server.lock:
                    state = supervisor.state_copy()
                checkpointer.save({**state, "restarts": restarts, "signature": signature})
                policy.started()

            policy = CheckpointPolicy(checkpoint_every_s or 0.0)

            def on_tick() -> None:
                if policy.due():
                    save()

            supervisor.on_tick.append(on_tick)
            try:
                outcome = supervisor.run()
            finally:
                save()  # also after a worker failure: a restart resumes from here
            summary = Summary(
                topology="own_loop",
                mode="distributed",
                algorithm=algorithm,
                workers=session.num_workers,
                comm_period=None,
                steps_per_worker=None,
                num_params=params.numel,
                figures=figures_of(outcome),
                restarts=restarts,
                resumed_worker_steps={str(r): s for r, s in server.resumed_steps.items()},
                failed_workers={str(r): why for r, why in outcome.failed_workers.items()},
                hyperparameters={"moving_rate": getattr(role, "moving_rate", None)},
                details={
                    "rejected_messages": outcome.rejected,
                    "worker_steps_per_s": {str(r): s.steps_per_s for r, s in server.stats.items()},
                    "hparams": hparams or {},
                },
            )
            if run_dir is not None:
                record = {"algorithm": algorithm, "workers": session.num_workers, **(hparams or {})}
                write_summary(runlog, summary, record)
        finally:
            runlog.close()
    params.assign(role.evaluated())
    return model
