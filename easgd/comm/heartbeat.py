"""Liveness of workers through the rendezvous store: a counter each worker bumps, watched by the server.

A counter (not a timestamp) is used so that no clocks need to agree across nodes: the server
notes, on its own clock, when it last saw each worker's counter move. A hung or stopped process
(SIGSTOP, a deadlock) stops bumping while its connection stays open, so heartbeats catch what
connection errors cannot. Measured here: detection within ``timeout_s`` plus one check interval.
"""

from __future__ import annotations

import threading
import time

import torch.distributed as dist


def _key(rank: int) -> str:
    return f"heartbeat/{rank}"


class HeartbeatSender:
    """Worker side: a daemon thread that bumps this rank's counter every ``interval_s``."""

    def __init__(self, store: dist.Store, rank: int, *, interval_s: float = 0.5) -> None:
        self._store, self._rank, self._interval = store, rank, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._store.add(_key(self._rank), 1)
            except Exception:  # the store went away: the run is over or the server died
                return
            self._stop.wait(self._interval)

    def start(self) -> HeartbeatSender:
        """Start beating."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop beating (on clean exit)."""
        self._stop.set()


class HeartbeatMonitor:
    """Server side: which workers' counters have not moved for ``timeout_s``."""

    def __init__(self, store: dist.Store, ranks: list[int], *, timeout_s: float) -> None:
        self._store = store
        self._timeout = timeout_s
        now = time.monotonic()
        self._seen = {rank: (-1, now) for rank in ranks}

    def stale(self, *, ignore: set[int] | frozenset[int] = frozenset()) -> dict[int, float]:
        """{rank: seconds since its counter last moved} for ranks silent longer than the timeout."""
        now = time.monotonic()
        silent = {}
        for rank, (count, since) in self._seen.items():
            if rank in ignore:
                continue
            current = int(self._store.add(_key(rank), 0))
            if current != count:
                self._seen[rank] = (current, now)
            elif now - since > self._timeout:
                silent[rank] = now - since
        return silent
