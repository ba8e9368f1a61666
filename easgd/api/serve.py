"""The server side of the own-loop API: the runtime's ParameterServer around a user's model.

``serve(model, session)`` holds the center (initialised from ``model``'s trainable parameters),
serves every worker with :class:`~easgd.engine.server.ParameterServer` and supervises the run with
:class:`~easgd.engine.supervisor.Supervisor` (the classes ``easgd.train`` uses: divergence guard,
heartbeats, stop rules, run log), evaluates the center with the user's
callback, and writes metrics.csv, TensorBoard events and summary.json into ``run_dir``. With a
``run_dir`` it takes consistent snapshots of the whole run with ``easgd.train``'s marker cut and
writer (:mod:`easgd.recovery.snapshot`; the workers' side is :mod:`easgd.api.snapshots`), and after
a torchrun restart every rank resumes from the newest committed one.

Buffers (BatchNorm running statistics) are not averaged: each worker keeps its own, and the center
has none. ``evaluate(model)`` receives the model holding the center's parameters and its own
buffers; recompute them there for the center (as for any averaged weights, e.g. with
``torch.optim.swa_utils.update_bn(batches, model)``) before measuring.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from easgd.algorithms.registry import spec_of
from easgd.api.keeper import kept_start, mark_started
from easgd.api.members import slot_server
from easgd.api.naming import algorithm_ran, read_optimizers
from easgd.api.optimizer import trainable_params
from easgd.api.roles import ModelParams
from easgd.api.session import Session
from easgd.api.snapshots import run_description
from easgd.comm.compression import Compression, check_format
from easgd.comm.groups import LaunchError
from easgd.comm.heartbeat import HeartbeatMonitor
from easgd.comm.membership import mark_run_over
from easgd.comm.transport import pair_transport
from easgd.config.algorithm import AlgorithmConfig
from easgd.engine.members import ElasticServer, ServerStart, start_server
from easgd.engine.server import ParameterServer, Resumed, ServePolicy
from easgd.engine.supervisor import ServerOutcome, Supervision, Supervisor
from easgd.parts.assembly import StopRule
from easgd.parts.runlog import RunLog
from easgd.parts.summary import Summary, write_summary
from easgd.recovery.checkpoint import Checkpointer
from easgd.recovery.resume import load_server_part
from easgd.recovery.snapshot import SnapshotCut, SnapshotLog, SnapshotWriter
from easgd.roles import make_server_role
from easgd.topologies.server import resumed_from

log = logging.getLogger("easgd")

WORKER_FAILURE = ("fail_fast", "continue")

Evaluate = Callable[[nn.Module], dict[str, float]]


def _check(
    algorithm: str,
    worker_failure: str,
    eval_interval_s: float,
    *,
    elastic: bool = False,
    run_dir: str | Path | None = None,
    slot_wait_s: float = 1.0,
) -> None:
    spec_of(algorithm, key="api.serve: algorithm").check_own_loop("api.serve")
    if worker_failure not in WORKER_FAILURE:
        raise ValueError(
            f"api.serve(worker_failure={worker_failure!r}); allowed: {', '.join(WORKER_FAILURE)}"
        )
    if not eval_interval_s > 0:
        raise ValueError(f"api.serve(eval_interval_s={eval_interval_s!r}) must be > 0")
    if not slot_wait_s > 0:
        raise ValueError(f"api.serve(slot_wait_s={slot_wait_s!r}) must be > 0")
    if elastic and run_dir is None:
        raise ValueError(
            "api.serve(run_dir=None) under membership='elastic': the ledgers that rebuild the "
            "center after a server restart live in run_dir/checkpoints; pass a run_dir"
        )


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
    compression: str = "none",
    error_feedback: bool = True,
    slot_wait_s: float = 120.0,
) -> nn.Module:
    """Rank 0: hold the center until every worker has closed; return ``model`` holding it.

    ``algorithm``: easgd or eamsgd (elastic; the workers' optimizer makes the difference, and
    summary.json names what they ran: eamsgd when a worker's optimizer has momentum > 0),
    downpour, adownpour or mvadownpour (``average_rate`` as in easgd.train). ``moving_rate``:
    alpha, default 0.9 / p. ``evaluate(model)`` returns ``test_loss`` and ``test_error`` of the
    center (missing keys are NaN); it runs at the start, every ``eval_interval_s`` and at the end.
    ``run_dir``: metrics.csv, TensorBoard (``tensorboard``), summary.json and a consistent
    snapshot of the server and every worker every ``checkpoint_every_s`` (None or 0: only at the
    end) in ``run_dir/checkpoints``; when ``resume``, every rank resumes from the newest
    committed one (without a run_dir: nothing is written). ``hparams`` are added to summary.json
    and TensorBoard's HParams entry. ``compression`` and ``error_feedback``: as
    ``comm.compression`` and ``comm.error_feedback`` of easgd.train (float32 models only); the
    workers learn them from the run description.

    Under ``api.join(membership="elastic")`` (workers that come and go; :mod:`easgd.api.members`)
    the run needs a ``run_dir`` (the ledgers), a slot whose worker died waits up to
    ``slot_wait_s`` for its replacement (then the run goes on without it), and a server started
    again by its keeper rebuilds the center exactly from the base and the ledgers.
    """
    if not session.is_server:
        raise LaunchError(
            "api.serve runs on rank 0; workers wrap their optimizer in ElasticOptimizer"
        )
    elastic = session.membership == "elastic"
    _check(
        algorithm,
        worker_failure,
        eval_interval_s,
        elastic=elastic,
        run_dir=run_dir,
        slot_wait_s=slot_wait_s,
    )
    config = AlgorithmConfig(name=algorithm, moving_rate=moving_rate, average_rate=average_rate)
    with _ends_the_run(session):
        # a server its keeper started again goes on with this job's run: it resumes
        center = _Center(model, session, config, run_dir, resume=resume or kept_start() > 1)
        center.open(compression, error_feedback, slot_wait_s if elastic else None)
        stop_rule = StopRule(max_wall_s=max_wall_s, target_test_error=target_test_error)
        runlog = RunLog(run_dir, tensorboard=tensorboard)  # run_dir None: records nothing
        try:
            center.run(
                ServePolicy(worker_failure == "continue", max_update_norm=max_update_norm),
                Supervision(eval_interval_s, stop_rule),
                runlog,
                evaluate,
                heartbeat_timeout_s,
                checkpoint_every_s,
                hparams or {},
            )
        finally:
            runlog.close()
    center.params.assign(center.role.evaluated())
    return model


@contextlib.contextmanager
def _ends_the_run(session: Session) -> Iterator[None]:
    """Elastic membership: the run is marked over when the server leaves (it ended, or it
    raised), so members arriving from then on leave quietly; a fixed roster needs nothing."""
    try:
        yield
    finally:
        if session.membership == "elastic" and session.store is not None:
            mark_run_over(session.store)


class _Center:
    """What ``serve`` holds: the center's role (resumed from the committed snapshot, if any) over
    the user's model, the checkpoint folder and what the workers are told about the run."""

    def __init__(
        self,
        model: nn.Module,
        session: Session,
        config: AlgorithmConfig,
        run_dir: str | Path | None,
        *,
        resume: bool,
    ) -> None:
        self.model, self.session, self.algorithm = model, session, config.name
        self.params = ModelParams(trainable_params(model))
        workers = session.num_workers
        self.role = make_server_role(config, self.params.vector().cpu(), num_workers=workers)
        self.signature = {"algorithm": config.name, "num_params": self.params.numel}
        self.signature["workers"] = workers
        self.directory = Path(run_dir) / "checkpoints" if run_dir is not None else None
        self.number: int | None = None
        self.restarts, self.resumed = 0, Resumed()
        self.start: ServerStart | None = None
        """This server start (elastic membership; None: a fixed roster)."""
        self.slot_wait_s: float | None = None
        """Elastic membership: how long a slot waits for its next member (None: fixed)."""
        if resume and self.directory is not None:
            self.number = SnapshotLog(self.directory).newest()
            checkpointer = Checkpointer(self.directory, "server")
            state = load_server_part(checkpointer, self.number, self.signature)
            self.number = self.number if state is not None else None
            self.restarts, self.resumed = resumed_from(self.role, state)
            if state is not None:  # a warning: seen even where the user set up no logging
                log.warning(
                    "resuming the run in %s from its committed snapshot %d (restart %d); pass "
                    "resume=False or a fresh run_dir to start over",
                    run_dir,
                    self.number,
                    self.restarts,
                )
        description = run_description(self.directory, self.number, self.signature)
        dtype = str(self.params.dtype)
        self.role_spec = config.spec
        self.published = {
            "algorithm": config.name,
            "numel": self.params.numel,
            "dtype": dtype,
            **description,
        }

    def open(self, compression: str, error_feedback: bool, slot_wait_s: float | None) -> None:
        """Tell the workers about the run, with the exchanges' compression and the membership
        (``slot_wait_s``: elastic, how long a slot waits for a member and a member for a slot or
        a server), then, under elastic membership, start serving slots (:meth:`start_slots`)."""
        self.slot_wait_s = slot_wait_s
        self.compression: Compression | None = None
        info = dict(self.published)
        if slot_wait_s is not None:
            info.update(membership="elastic", slot_wait_s=slot_wait_s)
        if check_format(compression) != "none":
            if self.params.dtype != torch.float32:
                raise ValueError(f"api.serve(compression={compression!r}) needs float32 parameters")
            elastic = self.role_spec.elastic
            self.compression = Compression(compression, error_feedback, elastic, self.params.numel)
            info.update(compression=compression, error_feedback=error_feedback)
        self.session.publish_run(info)
        if slot_wait_s is not None:
            self.start_slots()

    def run(
        self,
        policy: ServePolicy,
        supervision: Supervision,
        runlog: RunLog,
        evaluate: Evaluate | None,
        heartbeat_timeout_s: float,
        checkpoint_every_s: float | None,
        hparams: dict[str, Any],
    ) -> None:
        """Serve until every worker has closed (or a stop rule fired); write summary.json."""
        supervisor = self.supervise(policy, supervision, runlog, evaluate, heartbeat_timeout_s)
        writer = self.snapshot_writer(supervisor, checkpoint_every_s)
        outcome = supervisor.run()
        if writer is not None:
            writer.finish()  # the final snapshot: every worker's part is its final state
        committed = writer.committed if writer is not None else None
        described = read_optimizers(self.session.store, supervisor.server.transports)
        self.algorithm = algorithm_ran(self.algorithm, described)  # eamsgd: momentum workers
        summary = self.summary(supervisor.server, outcome, committed, hparams)
        record = {"algorithm": self.algorithm, "workers": self.session.num_workers}
        write_summary(runlog, summary, {**record, **hparams})

    def start_slots(self) -> None:
        """Elastic membership: recover the center (exact, from the base and the ledgers, for a
        server its keeper started again) and announce this server start to the members."""
        assert self.session.store is not None and self.directory is not None
        self.start = start_server(
            self.session.store,
            self.role,
            self.directory,
            list(range(1, self.session.num_workers + 1)),
            first_start=kept_start() == 1,
            restarts=self.restarts,
            audited=self.role_spec.ledger is not None,  # else the snapshot's center
        )
        self.restarts = self.start.restarts
        mark_started()
        log.info(
            "serving %d worker slots (elastic membership, server start %d, pid %d)",
            self.session.num_workers,
            self.start.epoch,
            os.getpid(),
        )

    def supervise(
        self,
        policy: ServePolicy,
        supervision: Supervision,
        runlog: RunLog,
        evaluate: Evaluate | None,
        heartbeat_timeout_s: float,
    ) -> Supervisor:
        """The parameter server over every worker's pair group (elastic membership: its slots),
        and its supervisor."""
        params, session = self.params, self.session
        cut = None
        if self.directory is not None:
            cut = SnapshotCut(next_number=SnapshotLog(self.directory).next_number())
        server: ParameterServer
        if self.slot_wait_s is not None:
            assert self.directory is not None and self.start is not None  # start_slots ran
            server = slot_server(
                session,
                self.role,
                self.algorithm,
                epoch=self.start.epoch,
                directory=self.directory,
                slot_wait_s=self.slot_wait_s,
                compression=self.compression,
                dtype=params.dtype,
                policy=policy,
                resumed=self.resumed,
                snapshots=cut,
            )
        else:
            transports = {
                rank: pair_transport(
                    self.compression,
                    peer=rank,
                    group=group,
                    numel=params.numel,
                    dtype=params.dtype,
                )
                for rank, group in session.groups.items()
            }
            server = ParameterServer(
                self.role, transports, policy, resumed=self.resumed, snapshots=cut
            )
        heartbeat = None
        if session.store is not None:
            heartbeat = HeartbeatMonitor(
                session.store, timeout_s=heartbeat_timeout_s, first_step_s=session.timeout_s
            )
        evaluator = _center_evaluator(self.model, params, evaluate)
        supervisor = Supervisor(server, evaluator, runlog, supervision, heartbeat=heartbeat)
        if self.start is not None:  # max_wall_s counts the job's time
            supervisor.elapsed_before_s = self.start.elapsed_before_s
        return supervisor

    def snapshot_writer(
        self, supervisor: Supervisor, every_s: float | None
    ) -> SnapshotWriter | None:
        """easgd.train's writer on the server's marker cut, ticking with the supervisor (None:
        no run_dir)."""
        cut = supervisor.server.snapshots
        if cut is None or self.directory is None:
            return None
        writer = SnapshotWriter(
            cut,
            supervisor,
            self.directory,
            every_s=every_s or 0.0,
            names=["server", *(f"worker{r}" for r in supervisor.server.transports)],
            extra={"restarts": self.restarts, "signature": self.signature},
        )
        supervisor.on_tick.append(writer.tick)
        return writer

    def summary(
        self,
        server: ParameterServer,
        outcome: ServerOutcome,
        committed: int | None,
        hparams: dict[str, Any],
    ) -> Summary:
        """summary.json of an own-loop run."""
        membership: dict[str, Any] = {"mode": "fixed"}
        if isinstance(server, ElasticServer):
            membership = server.membership_figures()
        return Summary(
            topology="own_loop",
            mode="distributed",
            algorithm=self.algorithm,
            workers=self.session.num_workers,
            comm_period=None,
            steps_per_worker=None,
            num_params=self.params.numel,
            figures=outcome.figures(),
            restarts=self.restarts,
            resumed_worker_steps={str(r): s for r, s in server.resumed_steps.items()},
            resumed_exchanges=server.resumed_exchanges,
            failed_workers={str(r): why for r, why in outcome.failed_workers.items()},
            hyperparameters={"moving_rate": getattr(self.role, "moving_rate", None)},
            details={
                "rejected_messages": outcome.rejected,
                "worker_steps_per_s": {str(r): s.steps_per_s for r, s in server.stats.items()},
                "resumed_snapshot": self.number,
                "committed_snapshot": committed,
                "hparams": hparams,
                "redone_steps_by_worker": {str(r): s.redone_steps for r, s in server.stats.items()},
                "membership": membership,
            },
        )


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
