"""Run supervision of a parameter server: what the main thread does while the workers are served.

:class:`Supervisor` owns everything about a run that is not serving one message: the evaluation
of the center (or z) every ``eval_interval_s`` (or ``eval_interval_steps``) without stopping the workers, and its history;
the stop rules (:class:`StopRule`); the liveness check of the workers' heartbeats (a worker whose
loop stops advancing is declared lost); hosting consistent snapshots (the cut's host: start one,
copy the server's state, tell when it is complete); the progress bar; the run log; and the main
loop, whose :attr:`Supervisor.on_tick` hooks (snapshot writers, the fault injector's server kill)
run after every pass. Serving and guarding is :class:`easgd.engine.server.ParameterServer`'s;
an exception in the supervisor's own code is a server error there, as in a serve thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from torch import Tensor

from easgd.comm.heartbeat import HeartbeatMonitor
from easgd.comm.message import Header
from easgd.engine.server import ParameterServer, WorkerStats
from easgd.parts import interrupt
from easgd.parts.assembly import EvalCadence, StopRule
from easgd.parts.progress import Progress
from easgd.parts.runlog import RunLog
from easgd.parts.summary import RunFigures

Evaluate = Callable[[Tensor], dict[str, float]]

HEARTBEAT_CHECK_S = 0.25
"""The least time between two liveness checks (each reads the store once per watched worker)."""


@dataclass(frozen=True)
class Supervision:
    """How a run is supervised: the settings of :class:`Supervisor`."""

    eval_interval_s: float | None
    """Seconds between two evaluations of the center (also at the start and the end); None:
    by ``eval_interval_steps``."""
    stop_rule: StopRule = field(default_factory=StopRule)
    """The wall-clock budget and the target test error."""
    total_steps: int = 0
    """Worker steps in the whole run (the progress bar's total)."""
    progress: bool = False
    """Show a progress bar on the console."""
    steps_per_worker: int = 0
    """A worker's step budget: a worker interrupted before it is not finished in a snapshot
    (0: every worker that said DONE is finished)."""
    eval_interval_steps: int | None = None
    """Instead of seconds: evaluate at each multiple of this many worker steps (all workers'),
    at the first pass of the main loop (about every 0.1 s) at or past it."""


@dataclass
class ServerOutcome:
    """The server's end-of-run figures."""

    wall_time_s: float
    exchanges: int
    server_updates: int
    worker_steps: int
    test_loss: float
    test_error: float
    stop_reason: str
    rejected: int
    failed_workers: dict[int, str] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)

    def figures(self) -> RunFigures:
        """The run figures of summary.json."""
        return RunFigures(**{f.name: getattr(self, f.name) for f in fields(RunFigures)})


class Supervisor:
    """Runs ``server`` from the main thread: evaluates with ``evaluate``, records in ``runlog``."""

    def __init__(
        self,
        server: ParameterServer,
        evaluate: Evaluate,
        runlog: RunLog,
        settings: Supervision,
        *,
        heartbeat: HeartbeatMonitor | None = None,
    ) -> None:
        self.server = server
        self.evaluate = evaluate
        self.runlog = runlog
        self.settings = settings
        self.heartbeat = heartbeat
        self.lock = server.lock
        """The server's lock (a snapshot cut's host exposes it)."""
        self.progress = Progress(settings.total_steps, enabled=settings.progress)
        self.on_tick: list[Callable[[], None]] = []
        """Called in order after every pass of the main loop (about every 0.1 s)."""
        self._wake = threading.Condition()
        self._started = time.perf_counter()
        self.elapsed_before_s = 0.0
        """Seconds the run had been going before this process's :meth:`run` (a server restarted
        within an elastic job): ``max_wall_s`` counts them too."""
        self._last_heartbeat_check = 0.0
        self._shown_steps = 0
        server.on_worker_end.append(self._worker_ended)
        if heartbeat is not None:
            server.on_member_join.append(heartbeat.watch)
        if runlog.writes_scalars:
            server.on_exchange.append(self._log_exchange)
        if server.snapshots is not None:
            server.snapshots.bind(self)

    # -- hooks on the server ---------------------------------------------------------------------
    def _worker_ended(self, rank: int) -> None:
        if self.heartbeat is not None:
            self.heartbeat.unwatch(rank)
        with self._wake:
            self._wake.notify_all()

    def _log_exchange(self, rank: int, header: Header, reply: Tensor, staleness: int) -> None:
        tag = f"worker{rank}"
        self.runlog.scalar(f"{tag}/train_loss", header.train_loss, header.step)
        self.runlog.scalar(f"{tag}/exchange_latency_ms", header.latency_ms, header.step)
        self.runlog.scalar(f"{tag}/staleness", staleness, header.step)
        distance = self.server.role.elastic_distance(reply)
        if distance is not None:
            self.runlog.scalar(f"{tag}/elastic_distance", distance, header.step)

    # -- evaluation, stop rules, liveness --------------------------------------------------------
    def _show_progress(self) -> None:
        steps = sum(s.steps for s in self.server.stats.values())
        self.progress.advance(steps - self._shown_steps, exchanges=self.server.exchanges)
        self._shown_steps = max(self._shown_steps, steps)

    def _evaluate(self) -> dict[str, float]:
        """Evaluate a copy of the center (taken under the lock) and record it; one history row."""
        server = self.server
        with server.lock:
            snapshot = server.role.evaluated().clone()
            figures: dict[str, Any] = {
                "server_updates": server.role.updates,
                "exchanges": server.exchanges,
            }
        metrics = self.evaluate(snapshot)
        figures["wall_s"] = time.perf_counter() - self._started
        figures["worker_steps"] = sum(s.steps for s in server.stats.values())
        row = {**figures, "test_loss": metrics["test_loss"], "test_error": metrics["test_error"]}
        self.runlog.evaluation(**row)
        self._show_progress()
        self.progress.note(test_error=metrics["test_error"])
        return {**figures, **metrics}

    def _check_stop(self, test_error: float | None = None) -> None:
        """Apply the stop rules: the target on a fresh ``test_error``, the wall-clock budget always."""
        if self.server.stop.is_set():
            return
        elapsed = time.perf_counter() - self._started + self.elapsed_before_s
        reason = self.settings.stop_rule.reason(elapsed_s=elapsed, test_error=test_error)
        if reason is not None:
            self.server.stop_run(reason)

    def _check_heartbeats(self) -> None:
        now = time.perf_counter()
        if self.heartbeat is None or now - self._last_heartbeat_check < HEARTBEAT_CHECK_S:
            return
        self._last_heartbeat_check = now
        stats = self.server.stats
        busy = {r for r, s in stats.items() if s.in_service}
        stale = self.heartbeat.stale(ignore=busy)  # store reads: not under the server's lock
        for rank, reason in stale.items():
            if stats[rank].finished or stats[rank].failed:
                continue
            self.heartbeat.unwatch(rank)
            self.server.declare_lost(rank, reason)

    # -- snapshot hosting (a cut's host) ---------------------------------------------------------
    def state_copy(self) -> dict[str, Any]:
        """A copy of the server's state, its part of a snapshot (call under :attr:`lock`)."""
        server = self.server
        return {
            "role": {
                k: v.clone() if isinstance(v, Tensor) else v
                for k, v in server.role.state_dict().items()
            },
            "exchanges": server.exchanges,
            "finished": sorted(
                {r for r, s in server.stats.items() if self._finished(s)} | server.finished_before
            ),
            "steps": {r: s.steps for r, s in server.stats.items()},
        }

    def _finished(self, stats: WorkerStats) -> bool:
        """A worker that said DONE is finished, unless an interruption stopped it short of its
        budget: a resumed run trains it on (its DONE payload is in the center already)."""
        if self.server.stop_reason != "interrupted":
            return stats.finished
        return stats.finished and stats.steps >= self.settings.steps_per_worker

    def running_workers(self) -> list[int]:
        """Workers neither finished nor failed nor lost (call under :attr:`lock`)."""
        return self.server.running_workers()

    def failed(self) -> bool:
        """Whether the run is ending on a failure (no snapshot can complete any more)."""
        return self.server.failed()

    # -- the main loop ---------------------------------------------------------------------------
    def run(self) -> ServerOutcome:
        """Serve until every worker has finished (or failed); evaluate meanwhile.

        Ends with every serve thread joined (but one blocked on a hung worker); re-raises a
        server error with its traceback, or raises if a worker failed under fail_fast.
        """
        server = self.server
        self._started = time.perf_counter()
        if self.heartbeat is not None:  # from the start: a worker can hang before its HELLO too
            for rank in server.transports:
                self.heartbeat.watch(rank)
        server.start()
        history: list[dict[str, float]] = []
        try:
            history.append(self._evaluate())
            self._supervise(history)
            if server.server_error is None:
                history.append(self._evaluate())
        except Exception as err:  # evaluation, the run log, a tick: the server's own code
            server.fail(err)
        finally:
            server.shut_down()
            self.progress.close()
        server.raise_failure()
        return self._outcome(history)

    def _supervise(self, history: list[dict[str, float]]) -> None:
        """The main loop: stop rules, liveness, evaluations on schedule, the tick hooks."""
        server, settings = self.server, self.settings
        cadence = EvalCadence(settings.eval_interval_s, settings.eval_interval_steps)
        cadence.done(self._elapsed(), steps=int(history[-1]["worker_steps"]))
        while server.serving():
            with self._wake:  # woken when a serve thread ends
                self._wake.wait(timeout=min(0.1, cadence.wait_s(self._elapsed())))
            if server.server_error is not None:
                break
            if interrupt.requested() and not server.stop.is_set():
                server.stop_run("interrupted")
            self._check_stop()
            self._check_heartbeats()
            steps = sum(s.steps for s in server.stats.values())
            if cadence.due(self._elapsed(), steps=steps):
                history.append(self._evaluate())
                self._check_stop(history[-1]["test_error"])
                cadence.done(self._elapsed(), steps=int(history[-1]["worker_steps"]))
            self._show_progress()
            for tick in self.on_tick:
                tick()

    def _elapsed(self) -> float:
        return time.perf_counter() - self._started

    def _outcome(self, history: list[dict[str, float]]) -> ServerOutcome:
        server, final = self.server, history[-1]
        return ServerOutcome(
            wall_time_s=final["wall_s"],
            exchanges=server.exchanges,
            server_updates=server.role.updates,
            worker_steps=int(final["worker_steps"]),
            test_loss=final["test_loss"],
            test_error=final["test_error"],
            stop_reason=server.stop_reason,
            rejected=sum(s.rejected for s in server.stats.values()),
            failed_workers={r: s.failed for r, s in server.stats.items() if s.failed},
            history=history,
        )
