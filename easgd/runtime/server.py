"""The parameter server: holds the center, serves each worker from its own thread, evaluates.

Whoever comes first is served first: every worker has a thread blocked on its own pair's receive,
and a lock around the server role makes each update atomic (without it the conservation of
center + sum of workers breaks). The main thread evaluates the center (or z) every
``eval_interval_s`` without stopping the workers, applies the stop rules and writes the run log.

Failures are told apart: a worker whose connection breaks, or whose training loop stops
advancing (:mod:`easgd.comm.heartbeat`), is *lost*; an exception in the server's own code (the
role, the run log) is a *server error*: every worker gets an error reply and leaves, and
:meth:`ParameterServer.run` re-raises the exception with its traceback. Serve threads are joined
at the end; only a thread blocked on a hung (stopped) worker cannot be, since gloo cannot cancel
a receive, and it is left behind as a daemon (the process still exits at once).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from easgd.comm.heartbeat import HeartbeatMonitor
from easgd.comm.message import (
    ERROR_NON_FINITE,
    ERROR_SERVER,
    ERROR_SHAPE_MISMATCH,
    Header,
    Op,
)
from easgd.comm.transport import PairTransport
from easgd.roles import ServerRole, UpdateRefused
from easgd.runtime.progress import Progress
from easgd.runtime.runlog import RunLog
from easgd.runtime.sharded_snapshot import BarrierCut
from easgd.runtime.snapshot import SnapshotCut

log = logging.getLogger("easgd.server")

Evaluate = Callable[[Tensor], dict[str, float]]


@dataclass
class StopRule:
    """When the server tells the workers to stop (besides their own step budget)."""

    max_wall_s: float | None = None
    target_test_error: float | None = None

    def reason(self, *, elapsed_s: float, test_error: float | None = None) -> str | None:
        """Why to stop now: the target on a fresh ``test_error``, or the wall-clock budget; else None."""
        target = self.target_test_error
        if test_error is not None and target is not None and test_error <= target:
            return "target_test_error"
        if self.max_wall_s is not None and elapsed_s >= self.max_wall_s:
            return "max_wall_s"
        return None


@dataclass
class WorkerStats:
    """What the server knows about one worker."""

    steps: int = 0
    exchanges: int = 0
    last_read: int = 0
    rejected: int = 0
    finished: bool = False
    failed: str | None = None
    steps_per_s: float = 0.0
    """The worker's own step rate over its loop, reported when it finishes."""
    redone_steps: int = 0
    """Steps this worker computed before the last crash and computes again (from its HELLO)."""
    in_service: bool = False
    """A message of this worker is being served (its silence is not its own)."""


class PeerLost(ConnectionError):
    """The connection to a worker broke (it died, or its process group failed)."""


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


class ParameterServer:
    """Serves ``transports`` (worker rank -> pair transport) with ``role``."""

    def __init__(
        self,
        role: ServerRole,
        transports: dict[int, PairTransport],
        *,
        evaluate: Evaluate,
        runlog: RunLog,
        stop_rule: StopRule,
        eval_interval_s: float,
        total_steps: int,
        continue_on_failure: bool = False,
        progress: bool = True,
        on_tick: Callable[[], None] | None = None,
        exchanges_before: int = 0,
        heartbeat: HeartbeatMonitor | None = None,
        max_update_norm: float | None = None,
        snapshots: SnapshotCut | BarrierCut | None = None,
        finished_before: set[int] | frozenset[int] = frozenset(),
    ) -> None:
        self.role = role
        self.transports = transports
        self.evaluate = evaluate
        self.runlog = runlog
        self.stop_rule = stop_rule
        self.eval_interval_s = eval_interval_s
        self.continue_on_failure = continue_on_failure
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.stop_reason = "steps"
        self.stats = {rank: WorkerStats() for rank in transports}
        self.exchanges = exchanges_before
        self.progress = Progress(total_steps, enabled=progress)
        self.on_tick = on_tick
        self.heartbeat = heartbeat
        self.max_update_norm = max_update_norm
        self.resumed_steps: dict[int, int] = {}
        """Each worker's step counter when it said HELLO (non-zero after a resume)."""
        self.snapshots = snapshots
        """The consistent-snapshot cut (None: no snapshots)."""
        if snapshots is not None:
            snapshots.bind(self)
        self.finished_before = set(finished_before)
        """Workers that had said DONE in the snapshot this run resumed from (their final
        payload, if they resend it, is already in the center)."""
        self.lost: set[int] = set()
        self._last_heartbeat_check = 0.0
        self._errors: list[BaseException] = []
        self.server_error: BaseException | None = None
        """The first exception raised by the server's own code; it ends the run."""
        self._wake = threading.Condition()
        self._started = time.perf_counter()

    # -- per-worker service ------------------------------------------------------------------
    @staticmethod
    def _recv(transport: PairTransport, *, control: bool = False) -> tuple[Header, Tensor | None]:
        try:
            return transport.recv_control() if control else transport.recv()
        except Exception as err:
            raise PeerLost(f"{type(err).__name__}: {err}") from err

    @staticmethod
    def _send(
        transport: PairTransport,
        header: Header,
        payload: Tensor | None = None,
        *,
        control: bool = False,
    ) -> None:
        try:
            if control:
                transport.send_control(header, payload)
            else:
                transport.send(header, payload)
        except Exception as err:
            raise PeerLost(f"{type(err).__name__}: {err}") from err

    def _serve(self, rank: int) -> None:
        try:
            self._serve_worker(rank)
        except PeerLost as err:  # a closed connection: the worker died or hung up
            self._worker_lost(rank, str(err), err)
        except Exception as err:  # a bug or failure in the server's own code
            self._fail_server(err)
            self._tell_server_failed(rank)
        finally:
            self.stats[rank].in_service = False
            if self.heartbeat is not None:
                self.heartbeat.unwatch(rank)
            with self._wake:
                self._wake.notify_all()

    def _serve_worker(self, rank: int) -> None:
        transport, stats = self.transports[rank], self.stats[rank]
        header, _ = self._recv(transport, control=True)
        if header.op != Op.HELLO:
            raise PeerLost(f"worker {rank} spoke before its handshake (op {header.op.name})")
        self._hello(rank, transport, header)
        while True:
            header, payload = self._recv(transport)
            stats.in_service = True
            if self.server_error is not None:
                self._tell_server_failed(rank)
                return
            if header.op == Op.HELLO:
                raise PeerLost(f"worker {rank} said HELLO twice")
            elif header.op == Op.EXCHANGE:
                self._exchange(rank, transport, header, payload)
            elif header.op == Op.DONE:
                with self.lock:
                    resent = rank in self.finished_before  # already in the center
                    if payload is not None and not resent and self._refuse(payload) is None:
                        self.role.handle(rank, payload)  # MDOWNPOUR's last gradient
                    # finished together with its last payload: a snapshot sees both or neither
                    stats.finished = True
                    if self.snapshots is not None:
                        self.snapshots.on_message(rank, header)
                self.progress.advance(header.step - stats.steps, exchanges=self.exchanges)
                stats.steps = header.step
                stats.steps_per_s = header.steps_per_s
                self._send(transport, Header(Op.REPLY))
                return
            elif header.op == Op.FAILED:
                stats.failed = f"worker raised an exception at step {header.step}"
                stats.steps = max(stats.steps, header.step)
                log.warning("worker %d left after an exception at step %d", rank, header.step)
                if self.continue_on_failure:
                    self._drop(rank)
                else:
                    self._errors.append(RuntimeError(f"worker {rank}: {stats.failed}"))
                    self.stop_reason = "worker_failure"
                    self.stop.set()
                return
            stats.in_service = False

    def _drop(self, rank: int) -> None:
        with self.lock:
            if self.snapshots is not None:
                self.snapshots.drop(rank)

    def _worker_lost(self, rank: int, why: str, err: BaseException) -> None:
        stats = self.stats[rank]
        if stats.failed or stats.finished:
            return
        stats.failed = why
        if self.continue_on_failure:  # under fail_fast no snapshot may complete without it
            self._drop(rank)
        if self.stop.is_set() and self.stop_reason == "worker_failure" and self._errors:
            log.info("worker %d left after the run stopped (%s)", rank, why)
        elif self.continue_on_failure:
            log.warning("worker %d lost (%s); continuing with the others", rank, why)
        else:
            log.error("worker %d lost (%s); stopping (worker_failure=fail_fast)", rank, why)
            self._errors.append(err)
            self.stop_reason = "worker_failure"
            self.stop.set()

    def _fail_server(self, err: BaseException) -> None:
        """The server's own code raised: stop the run; every worker gets an error reply."""
        if self.server_error is None:
            self.server_error = err
            log.error("server error, ending the run", exc_info=err)
        self.stop_reason = "server_error"
        self.stop.set()

    def _tell_server_failed(self, rank: int) -> None:
        try:
            self.transports[rank].send(Header(Op.REPLY, error=ERROR_SERVER, stop=True))
        except Exception as err:  # the worker may be gone as well
            log.debug("could not tell worker %d that the server failed: %s", rank, err)

    def _hello(self, rank: int, transport: PairTransport, header: Header) -> None:
        if header.num_params != transport.numel:
            log.error(
                "worker %d has %d parameters, the server's model has %d",
                rank,
                header.num_params,
                transport.numel,
            )
            self._send(
                transport,
                Header(Op.REPLY, error=ERROR_SHAPE_MISMATCH, num_params=transport.numel),
                control=True,
            )
            raise PeerLost(
                f"worker {rank} model has {header.num_params} parameters, server has {transport.numel}; "
                "every rank must build the same model (same model.* config)"
            )
        with self.lock:
            center = self.role.center.clone()
            self.stats[rank].last_read = self.role.updates
        self.stats[rank].steps = self.resumed_steps[rank] = header.step
        self.stats[rank].redone_steps = header.redone_steps
        self.progress.advance(header.step, exchanges=self.exchanges)
        self._send(transport, Header(Op.REPLY, step=self.role.updates), center, control=True)

    def _exchange(
        self, rank: int, transport: PairTransport, header: Header, payload: Tensor | None
    ) -> None:
        stats = self.stats[rank]
        # checks on this thread's own payload, outside the lock that serialises the workers
        refusal = self._refuse(payload)
        with self.lock:
            mark = self.snapshots.on_message(rank, header) if self.snapshots is not None else 0
            staleness = self.role.updates - stats.last_read
            if refusal is None:
                try:
                    # the reply goes into this worker's own receive buffer (the payload is read
                    # first), so it stays consistent once the lock is released
                    reply = self.role.handle(
                        rank, payload, out=payload, max_update_norm=self.max_update_norm
                    )
                except UpdateRefused as err:
                    refusal = str(err)
            if refusal is None:
                stats.last_read = self.role.updates
                self.exchanges += 1
            else:
                reply = self.role.reply_center(out=payload)
                stats.last_read = self.role.updates
            exchanges = self.exchanges
        if refusal is not None:
            # divergence guard: the center never sees it; the worker restarts from the center
            stats.rejected += 1
            log.warning(
                "refused worker %d's update at step %d (%s); reset to the center",
                rank,
                header.step,
                refusal,
            )
            self._send(
                transport,
                Header(Op.REPLY, error=ERROR_NON_FINITE, stop=self.stop.is_set(), snapshot=mark),
                reply,
            )
            return
        self._send(
            transport,
            Header(
                Op.REPLY,
                step=exchanges,
                staleness=staleness,
                stop=self.stop.is_set(),
                snapshot=mark,
            ),
            reply,
        )
        advanced = header.step - stats.steps
        stats.steps, stats.exchanges = header.step, stats.exchanges + 1
        self.progress.advance(advanced, exchanges=exchanges)
        self._log_exchange(rank, header, reply, staleness, exchanges)

    def _refuse(self, payload: Tensor | None) -> str | None:
        """Why an update must not reach the center, or None: one read pass over ``payload``.

        Needs no lock (the payload is the serving thread's own). Where the update's norm depends
        on the center (elastic), the role measures it during the update instead.
        """
        if payload is None:
            return None
        norm = self.role.update_norm(payload) if self.max_update_norm is not None else None
        # a NaN or infinity anywhere makes the norm (or the sum) non-finite
        if not math.isfinite(float(payload.sum()) if norm is None else norm):
            return "non-finite values"
        if norm is not None and self.max_update_norm is not None and norm > self.max_update_norm:
            return f"update norm {norm:.3g} > max_update_norm {self.max_update_norm:g}"
        return None

    def _log_exchange(
        self, rank: int, header: Header, reply: Tensor, staleness: int, exchanges: int
    ) -> None:
        if not self.runlog.writes_scalars:
            return
        tag = f"worker{rank}"
        self.runlog.scalar(f"{tag}/train_loss", header.train_loss, header.step)
        self.runlog.scalar(f"{tag}/exchange_latency_ms", header.latency_ms, header.step)
        self.runlog.scalar(f"{tag}/staleness", staleness, header.step)
        distance = self.role.elastic_distance(reply)
        if distance is not None:
            self.runlog.scalar(f"{tag}/elastic_distance", distance, header.step)

    # -- evaluation and stop rules --------------------------------------------------------------
    def _evaluate(self) -> dict[str, float]:
        with self.lock:
            snapshot = self.role.evaluated().clone()
            updates = self.role.updates
            exchanges = self.exchanges
        metrics = self.evaluate(snapshot)
        wall = time.perf_counter() - self._started
        steps = sum(s.steps for s in self.stats.values())
        self.runlog.evaluation(
            wall_s=wall,
            exchanges=exchanges,
            server_updates=updates,
            worker_steps=steps,
            test_loss=metrics["test_loss"],
            test_error=metrics["test_error"],
        )
        self.progress.note(test_error=metrics["test_error"])
        return {"wall_s": wall, "exchanges": exchanges, "worker_steps": steps, **metrics}

    def _check_stop(self, test_error: float | None = None) -> None:
        """Apply the stop rules: the target on a fresh ``test_error``, the wall-clock budget always."""
        if self.stop.is_set():
            return
        elapsed = time.perf_counter() - self._started
        reason = self.stop_rule.reason(elapsed_s=elapsed, test_error=test_error)
        if reason is not None:
            self.stop_reason = reason
            self.stop.set()

    def _check_heartbeats(self) -> None:
        now = time.perf_counter()
        if self.heartbeat is None or now - self._last_heartbeat_check < 0.25:
            return
        self._last_heartbeat_check = now
        busy = {r for r, s in self.stats.items() if s.in_service}
        stale = self.heartbeat.stale(ignore=busy)  # store reads: not under the server's lock
        for rank, reason in stale.items():
            if self.stats[rank].finished or self.stats[rank].failed:
                continue
            self.heartbeat.unwatch(rank)
            self.lost.add(rank)
            self._worker_lost(rank, reason, RuntimeError(f"worker {rank}: {reason}"))

    def _running(self, threads: dict[int, threading.Thread]) -> bool:
        return any(t.is_alive() for r, t in threads.items() if r not in self.lost)

    def begin_snapshot(self) -> tuple[int, dict[str, Any]] | None:
        """Start a consistent snapshot: (its number, a copy of the server's state), or None if
        one is still in progress. The workers' parts follow at their next messages."""
        if self.snapshots is None:
            return None
        if not isinstance(self.snapshots, SnapshotCut):
            raise TypeError(
                "begin_snapshot is the single server's cut; shards use BarrierCut.begin"
            )
        with self.lock:
            if self.snapshots.in_progress or self.failed():
                return None
            number = self.snapshots.begin(self.running_workers())
            state = self.state_copy()
        return number, state

    def running_workers(self) -> list[int]:
        """Workers neither finished nor failed nor lost (call under :attr:`lock`)."""
        return [r for r, s in self.stats.items() if not (s.finished or s.failed or r in self.lost)]

    def state_copy(self) -> dict[str, Any]:
        """A copy of the server's state, its part of a snapshot (call under :attr:`lock`)."""
        return {
            "role": {
                k: v.clone() if isinstance(v, Tensor) else v
                for k, v in self.role.state_dict().items()
            },
            "exchanges": self.exchanges,
            "finished": sorted(
                {r for r, s in self.stats.items() if s.finished} | self.finished_before
            ),
        }

    def failed(self) -> bool:
        """Whether the run is ending on a failure (a worker under fail_fast, or the server)."""
        return bool(self._errors) or self.server_error is not None

    def snapshot_complete(self) -> int | None:
        """The number of the snapshot in progress once every worker's part is saved, else None."""
        if self.snapshots is None:
            return None
        with self.lock:
            return self.snapshots.complete()

    def run(self) -> ServerOutcome:
        """Serve until every worker has finished (or failed); evaluate meanwhile.

        Ends with every serve thread joined (but one blocked on a hung worker); re-raises a
        server error with its traceback, or raises if a worker failed under fail_fast.
        """
        threads = {
            rank: threading.Thread(
                target=self._serve, args=(rank,), name=f"serve-worker{rank}", daemon=True
            )
            for rank in self.transports
        }
        self._started = time.perf_counter()
        if self.heartbeat is not None:  # from the start: a worker can hang before its HELLO too
            for rank in self.transports:
                self.heartbeat.watch(rank)
        for thread in threads.values():
            thread.start()
        history: list[dict[str, float]] = []
        try:
            history.append(self._evaluate())
            next_eval = time.perf_counter() + self.eval_interval_s
            while self._running(threads):
                with self._wake:  # woken when a serve thread ends
                    self._wake.wait(timeout=min(0.1, max(0.0, next_eval - time.perf_counter())))
                if self.server_error is not None:
                    break
                self._check_stop()
                self._check_heartbeats()
                if time.perf_counter() >= next_eval:
                    history.append(self._evaluate())
                    self._check_stop(history[-1]["test_error"])
                    next_eval = time.perf_counter() + self.eval_interval_s
                if self.on_tick is not None:
                    self.on_tick()
            if self.server_error is None:
                history.append(self._evaluate())
        except Exception as err:  # evaluation, the run log, a tick: the server's own code
            self._fail_server(err)
        finally:
            self._shut_down(threads)
        if self.server_error is not None:
            raise self.server_error
        if self._errors and not self.continue_on_failure:
            raise RuntimeError(f"a worker failed: {self._errors[0]}") from self._errors[0]
        final = history[-1]
        return ServerOutcome(
            wall_time_s=final["wall_s"],
            exchanges=self.exchanges,
            server_updates=self.role.updates,
            worker_steps=int(final["worker_steps"]),
            test_loss=final["test_loss"],
            test_error=final["test_error"],
            stop_reason=self.stop_reason,
            rejected=sum(s.rejected for s in self.stats.values()),
            failed_workers={r: s.failed for r, s in self.stats.items() if s.failed},
            history=history,
        )

    def _shut_down(self, threads: dict[int, threading.Thread], *, grace_s: float = 5.0) -> None:
        """Join the serve threads; after a server error, workers waiting for a reply get one."""
        self.stop.set()
        deadline = time.perf_counter() + grace_s
        for rank, thread in threads.items():
            if rank in self.lost:
                continue  # blocked on a hung worker: gloo cannot cancel its receive
            if self.server_error is not None:
                thread.join(timeout=max(0.0, deadline - time.perf_counter()))
            else:
                thread.join()  # each remaining worker is told to stop at its next exchange
            if thread.is_alive():
                log.warning("serve thread of worker %d did not end; leaving it behind", rank)
        self.progress.close()
