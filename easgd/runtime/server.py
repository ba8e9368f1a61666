"""The parameter server: holds the center, serves each worker from its own thread, evaluates.

Whoever comes first is served first: every worker has a thread blocked on its own pair's receive,
and a lock around the server role makes each update atomic (without it the conservation of
center + sum of workers breaks). The main thread evaluates the center (or z) every
``eval_interval_s`` without stopping the workers, applies the stop rules and writes the run log.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor

from easgd.comm.heartbeat import HeartbeatMonitor
from easgd.comm.message import ERROR_NON_FINITE, ERROR_SHAPE_MISMATCH, Header, Op
from easgd.comm.transport import PairTransport
from easgd.roles import ElasticServer, ServerRole, UpdateRefused
from easgd.runtime.progress import Progress
from easgd.runtime.runlog import RunLog

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
        self.lost: set[int] = set()
        self._last_heartbeat_check = 0.0
        self._errors: list[BaseException] = []
        self._started = time.perf_counter()

    # -- per-worker service ------------------------------------------------------------------
    def _serve(self, rank: int) -> None:
        transport, stats = self.transports[rank], self.stats[rank]
        try:
            header, _ = transport.recv_control()
            if header.op != Op.HELLO:
                raise RuntimeError(
                    f"worker {rank} spoke before its handshake (op {header.op.name})"
                )
            self._hello(rank, transport, header)
            while True:
                header, payload = transport.recv()
                if header.op == Op.HELLO:
                    raise RuntimeError(f"worker {rank} said HELLO twice")
                elif header.op == Op.EXCHANGE:
                    self._exchange(rank, transport, header, payload)
                elif header.op == Op.DONE:
                    if payload is not None:  # MDOWNPOUR's last gradient
                        with self.lock:
                            if self._refuse(payload) is None:
                                self.role.handle(rank, payload)
                    self.progress.advance(header.step - stats.steps, exchanges=self.exchanges)
                    stats.steps = header.step
                    stats.steps_per_s = header.value
                    stats.finished = True
                    transport.send(Header(Op.REPLY))
                    return
                elif header.op == Op.FAILED:
                    stats.failed = f"worker raised an exception at step {header.step}"
                    log.warning("worker %d left after an exception at step %d", rank, header.step)
                    return
        except Exception as err:  # a closed connection: the worker died or hung up
            stats.failed = f"{type(err).__name__}: {err}"
            if self.continue_on_failure:
                log.warning("worker %d lost (%s); continuing with the others", rank, stats.failed)
            else:
                log.error(
                    "worker %d lost (%s); stopping (worker_failure=fail_fast)", rank, stats.failed
                )
                self._errors.append(err)
                self.stop.set()
                self.stop_reason = "worker_failure"

    def _hello(self, rank: int, transport: PairTransport, header: Header) -> None:
        if int(header.value) != transport.numel:
            log.error(
                "worker %d has %d parameters, the server's model has %d",
                rank,
                int(header.value),
                transport.numel,
            )
            transport.send_control(
                Header(Op.REPLY, error=ERROR_SHAPE_MISMATCH, value=transport.numel)
            )
            raise RuntimeError(
                f"worker {rank} model has {int(header.value)} parameters, server has {transport.numel}; "
                "every rank must build the same model (same model.* config)"
            )
        with self.lock:
            center = self.role.center.clone()
            self.stats[rank].last_read = self.role.updates
        self.stats[rank].steps = self.resumed_steps[rank] = header.step
        self.progress.advance(header.step, exchanges=self.exchanges)
        transport.send_control(Header(Op.REPLY, step=self.role.updates), center)

    def _exchange(
        self, rank: int, transport: PairTransport, header: Header, payload: Tensor | None
    ) -> None:
        stats = self.stats[rank]
        # checks on this thread's own payload, outside the lock that serialises the workers
        refusal = self._refuse(payload)
        with self.lock:
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
            transport.send(Header(Op.REPLY, error=ERROR_NON_FINITE, stop=self.stop.is_set()), reply)
            return
        transport.send(
            Header(Op.REPLY, step=exchanges, staleness=staleness, stop=self.stop.is_set()), reply
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
        self.runlog.scalar(f"{tag}/train_loss", header.value, header.step)
        self.runlog.scalar(f"{tag}/exchange_latency_ms", header.latency_ms, header.step)
        self.runlog.scalar(f"{tag}/staleness", staleness, header.step)
        if isinstance(self.role, ElasticServer):
            # e = alpha (x_i - center), so ||x_i - center|| = ||e|| / alpha
            distance = float(reply.norm()) / self.role.moving_rate
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
        if self.heartbeat is None or now - self._last_heartbeat_check < 0.5:
            return
        self._last_heartbeat_check = now
        done = {r for r, s in self.stats.items() if s.finished or s.failed} | self.lost
        for rank, silent_s in self.heartbeat.stale(ignore=done).items():
            reason = f"no heartbeat for {silent_s:.1f} s (hung or stopped)"
            self.stats[rank].failed = reason
            self.lost.add(rank)
            if self.continue_on_failure:
                log.warning("worker %d: %s; continuing with the others", rank, reason)
            else:
                log.error("worker %d: %s; stopping (worker_failure=fail_fast)", rank, reason)
                self._errors.append(RuntimeError(f"worker {rank}: {reason}"))
                self.stop_reason = "worker_failure"
                self.stop.set()

    def run(self) -> ServerOutcome:
        """Serve until every worker has finished (or failed); evaluate meanwhile."""
        threads = [
            threading.Thread(
                target=self._serve, args=(rank,), name=f"serve-worker{rank}", daemon=True
            )
            for rank in self.transports
        ]
        self._started = time.perf_counter()
        for thread in threads:
            thread.start()
        history = [self._evaluate()]
        next_eval = time.perf_counter() + self.eval_interval_s
        while any(
            t.is_alive()
            for r, t in zip(self.transports, threads, strict=True)
            if r not in self.lost
        ):
            self._check_stop()
            self._check_heartbeats()
            if time.perf_counter() >= next_eval:
                history.append(self._evaluate())
                self._check_stop(history[-1]["test_error"])
                if self.on_tick is not None:
                    self.on_tick()
                next_eval = time.perf_counter() + self.eval_interval_s
            for thread in threads:
                thread.join(timeout=0.02)
        final = self._evaluate()
        history.append(final)
        self.progress.close()
        if self._errors and not self.continue_on_failure:
            raise RuntimeError(f"a worker failed: {self._errors[0]}") from self._errors[0]
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
