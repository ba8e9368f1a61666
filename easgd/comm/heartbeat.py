"""Liveness of workers from their training loops, published through the rendezvous store.

The training loop itself bumps a progress counter at every step (:meth:`LoopHeartbeat.beat`); a
daemon thread only publishes it, with the loop's measured pace, every ``interval_s``. So a stuck
step (a deadlock, a hung data loader) stops the counter even though the thread runs on, and a
stopped process (SIGSTOP) stops both. The server (:class:`HeartbeatMonitor`) notes on its own
clock when each counter last moved (no clocks need to agree across nodes) and declares a worker
hung when it has been silent for longer than its allowance: ``max(timeout_s, pace_factor x its
own measured step time)``, so a legitimately slow worker is not declared lost; before a worker's
first step has been measured (warm-up) the allowance is ``first_step_s``. The thread publishes
at once when the loop measures its first pace (its second step), not at its next tick: a worker
stopped in its first ``interval_s`` would otherwise stay in the warm-up allowance
(``comm.timeout_s``, 120 s by default) instead of ``max(timeout_s, 10 x step time)``.

Store errors are reported as such: the sender retries and, once the store has been unreachable
for ``timeout_s``, the worker's loop raises :class:`HeartbeatError`; the monitor does not read a
store error as silence.
"""

from __future__ import annotations

import logging
import threading
import time

import torch.distributed as dist

log = logging.getLogger("easgd.heartbeat")


class HeartbeatError(RuntimeError):
    """The rendezvous store that carries heartbeats has been unreachable for too long."""


def _key(rank: int) -> str:
    return f"heartbeat/{rank}"


class LoopHeartbeat:
    """Worker side: the loop calls :meth:`beat` per step; a daemon thread publishes the count."""

    def __init__(
        self, store: dist.Store, rank: int, *, interval_s: float = 0.5, timeout_s: float = 10.0
    ) -> None:
        self._store, self._rank = store, rank
        self._interval, self._timeout = interval_s, timeout_s
        self.progress = 0
        """Steps the loop has completed (only the loop writes it)."""
        self.pace_s = 0.0
        """Moving average of the loop's time per step, exchanges and slowdown included."""
        self._last_beat: float | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()  # publish now (set with _stop, and at the first pace)
        self._error: HeartbeatError | None = None
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def beat(self) -> None:
        """One more step done (called by the training loop, not by a thread of its own)."""
        now = time.perf_counter()
        if self._last_beat is not None:
            took = now - self._last_beat
            self.pace_s = took if self.pace_s == 0.0 else 0.9 * self.pace_s + 0.1 * took
        self._last_beat = now
        self.progress += 1
        if self.progress == 2:  # the first measured pace ends the warm-up allowance: publish it
            self._wake.set()

    def check(self) -> None:
        """Raise :class:`HeartbeatError` if the store has been unreachable for ``timeout_s``."""
        if self._error is not None:
            raise self._error

    def _publish(self) -> None:
        self._store.set(_key(self._rank), f"{self.progress} {self.pace_s:.6f}")

    def _run(self) -> None:
        failing_since: float | None = None
        while not self._stop.is_set():
            self._wake.clear()  # a wake during the publish below triggers one more
            try:
                self._publish()
                failing_since = None
            except Exception as err:
                now = time.monotonic()
                if failing_since is None:
                    failing_since = now
                    log.warning(
                        "heartbeat: the rendezvous store is unreachable (%s); retrying", err
                    )
                elif now - failing_since > self._timeout:
                    self._error = HeartbeatError(
                        f"the rendezvous store has been unreachable for {now - failing_since:.0f} s "
                        f"({type(err).__name__}: {err}); the server cannot tell this worker is alive"
                    )
                    return
            self._wake.wait(self._interval)

    def start(self) -> LoopHeartbeat:
        """Publish once (so the key exists before the handshake), then start the thread."""
        self._publish()
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop publishing and join the thread."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self._interval + 5.0)


class HeartbeatMonitor:
    """Server side: which watched workers' loops have not moved for longer than their allowance."""

    def __init__(
        self,
        store: dist.Store,
        *,
        timeout_s: float,
        first_step_s: float,
        pace_factor: float = 10.0,
    ) -> None:
        self._store = store
        self.timeout_s = timeout_s
        self.first_step_s = first_step_s
        self.pace_factor = pace_factor
        self._seen: dict[int, tuple[str, float]] = {}
        self._lock = threading.Lock()  # watch/unwatch come from serve threads
        self._failing_since: float | None = None

    def watch(self, rank: int) -> None:
        """Start watching ``rank``, as if it had just beaten."""
        with self._lock:
            self._seen[rank] = ("", time.monotonic())

    def unwatch(self, rank: int) -> None:
        """Stop watching ``rank`` (finished, failed or lost)."""
        with self._lock:
            self._seen.pop(rank, None)

    def _note(self, rank: int, value: str, now: float) -> tuple[str, float] | None:
        """Record ``rank``'s value; returns its previous (value, since), None if not watched."""
        with self._lock:
            if rank not in self._seen:
                return None
            last, since = self._seen[rank]
            if value != last:
                self._seen[rank] = (value, now)
            return last, since

    def allowance_s(self, value: str) -> float:
        """How long a worker whose last published ``value`` is this may stay silent."""
        progress, _, pace = value.partition(" ")
        if not progress or int(progress) < 2 or not pace or float(pace) <= 0:
            return self.first_step_s
        return max(self.timeout_s, self.pace_factor * float(pace))

    def stale(self, *, ignore: set[int] | frozenset[int] = frozenset()) -> dict[int, str]:
        """{rank: why} for watched ranks silent longer than their allowance.

        Raises :class:`HeartbeatError` when the store has been unreachable for ``timeout_s``.
        """
        now = time.monotonic()
        silent = {}
        try:
            with self._lock:
                ranks = list(self._seen)
            for rank in ranks:
                if rank in ignore:  # being served: its silence is the server's, not its own
                    with self._lock:
                        if rank in self._seen:
                            self._seen[rank] = (self._seen[rank][0], now)
                    continue
                key = _key(rank)
                value = self._store.get(key).decode() if self._store.check([key]) else ""
                previous = self._note(rank, value, now)
                if previous is None or value != previous[0]:
                    continue
                allowance = self.allowance_s(value)
                if now - previous[1] > allowance:
                    silent[rank] = (
                        f"its training loop has not advanced for {now - previous[1]:.1f} s "
                        f"(allowance {allowance:.1f} s; hung, stuck or stopped)"
                    )
            self._failing_since = None
        except Exception as err:
            if self._failing_since is None:
                self._failing_since = now
                log.warning("heartbeat: cannot read the rendezvous store (%s)", err)
            elif now - self._failing_since > self.timeout_s:
                raise HeartbeatError(
                    f"the rendezvous store has been unreachable for {now - self._failing_since:.0f} s "
                    f"({type(err).__name__}: {err})"
                ) from err
        return silent
