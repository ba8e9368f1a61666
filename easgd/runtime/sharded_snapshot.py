"""Consistent snapshots of a sharded center (``server.shards = k``): the cut and its files.

:class:`BarrierCut` is one shard's side of the cut (how it differs from the single server's
:class:`easgd.runtime.snapshot.SnapshotCut` is in its docstring); :class:`ShardSnapshotWriter`
writes each shard's part off the server's lock, and the lead shard commits a snapshot once every
shard has written its part (each shard reports the newest part it wrote through the run's
rendezvous store). Restarted shards and workers resume from the newest committed snapshot, as
in an unsharded run (:mod:`easgd.runtime.resume`).
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

from easgd.comm.message import Header, Op
from easgd.runtime.checkpoint import Checkpointer
from easgd.runtime.snapshot import CheckpointPolicy, CutHost, OpenSnapshot, SnapshotLog

log = logging.getLogger("easgd")


class BarrierCut:
    """One shard's side of a consistent snapshot of a sharded center (``server.shards = k``).

    With k shards the single server's cut (:class:`easgd.runtime.snapshot.SnapshotCut`) does not
    work: each shard would copy its slice at its own moment, so "the first message after the
    start" would be a different exchange of the same worker on different shards. Here the cut is
    drawn by the workers' own exchanges:

    1. The lead shard (0) starts snapshot n and marks its reply to each running worker's first
       exchange after that (an exchange applied normally on every shard).
    2. The worker applies that reply, saves its state, and says so (``saved_snapshot = n``) in
       its next message to *every* shard: exchanges before that message are inside the cut,
       that message and later ones outside, the same exchanges on every shard.
    3. A shard serves untagged messages as usual. A tagged message waits (its serve thread
       blocks, releasing the lock) until every running worker has crossed the cut at this shard
       (sent its tagged message or DONE); at that moment the shard's state holds exactly the
       exchanges inside the cut. It copies that state (its part), then serves the waiting ones.
    4. The parts are written off the lock (:meth:`take_parts`); the lead commits n once every
       shard has written its part (every worker's part is on disk before its tag is sent).

    The cost is a short stall per snapshot: a worker that crosses the cut first waits at most
    until the slowest worker's next two exchanges. A DONE counts as crossing (the worker wrote
    its final state first, and its last payload is applied before the shard copies its state).
    """

    begun_by_server = False
    """Snapshots are started by the lead shard's writer (:meth:`begin`), not by the server."""

    def __init__(self, *, lead: bool, next_number: int = 1, poll_s: float = 0.05) -> None:
        self.lead = lead
        self.next_number = next_number
        self.poll_s = poll_s
        self._host: CutHost | None = None
        self._changed: threading.Condition | None = None
        self._open: OpenSnapshot | None = None
        self._parts: list[tuple[int, dict[str, Any]]] = []
        self.last_captured = 0
        """The newest snapshot whose part this shard has copied."""

    def bind(self, host: CutHost) -> None:
        """Serve ``host``: its lock guards the cut; tagged messages wait on it."""
        self._host = host
        self._changed = threading.Condition(host.lock)

    def _bound(self) -> tuple[CutHost, threading.Condition]:
        if self._host is None or self._changed is None:
            raise RuntimeError("BarrierCut.bind(server) must be called before use")
        return self._host, self._changed

    @property
    def in_progress(self) -> bool:
        """Whether a snapshot is open at this shard (its part not copied yet)."""
        return self._open is not None

    def begin(self) -> int | None:
        """Lead shard: start the next snapshot now (None if one is open or the run is failing)."""
        if not self.lead:
            raise RuntimeError("only the lead shard starts snapshots")
        host, changed = self._bound()
        with changed:
            if self._open is not None or host.failed():
                return None
            running = host.running_workers()
            number, self.next_number = self.next_number, self.next_number + 1
            self._open = OpenSnapshot(number, set(running), set(running))
            self._capture_if_complete()
            return number

    def on_message(self, rank: int, header: Header) -> int:
        """Note a worker's message (under the server's lock); returns the number to mark its
        reply with (0: none). A tagged message returns only once this shard's part is copied."""
        host, changed = self._bound()
        snap = self._open
        if header.op == Op.DONE:
            if snap is not None:
                snap.forget(rank)
                self._capture_if_complete()
            return 0
        tag = header.saved_snapshot
        if tag > self.last_captured:  # this message is outside the cut of snapshot ``tag``
            if snap is None:  # the first sign of it at this shard
                snap = self._open = OpenSnapshot(tag, set(), set(host.running_workers()))
            if tag != snap.number:
                raise RuntimeError(
                    f"worker {rank} tagged snapshot {tag} while {snap.number} is open"
                )
            snap.missing.discard(rank)
            while not self._capture_if_complete() and self.last_captured < tag:
                if host.failed():  # this snapshot can never complete: serve the message
                    break
                changed.wait(self.poll_s)
            return 0
        return snap.mark(rank) if snap is not None and self.lead else 0

    def drop(self, rank: int) -> None:
        """A worker failed or was lost (continue policy): the snapshot goes on without it."""
        if self._open is not None:
            self._open.forget(rank)
            self._capture_if_complete()

    def complete(self) -> int | None:
        """Unused: a sharded snapshot completes when every shard has written its part."""
        return None

    def _capture_if_complete(self) -> bool:
        snap = self._open
        if snap is None or snap.missing:
            return False
        host, changed = self._bound()
        self._parts.append((snap.number, host.state_copy()))
        self.last_captured, self._open = snap.number, None
        changed.notify_all()
        return True

    def take_parts(self) -> list[tuple[int, dict[str, Any]]]:
        """The parts copied since the last call, to write to disk (call under the lock)."""
        parts, self._parts = self._parts, []
        return parts

    def abandon(self) -> int:
        """At the end of a run: drop any open snapshot; returns the number for the final one."""
        self._open = None
        number, self.next_number = self.next_number, self.next_number + 1
        return number


class ShardSnapshotWriter:
    """Writes this shard's parts of sharded snapshots; on the lead shard, starts and commits them.

    Call :meth:`tick` from the server's main loop (``on_tick``), :meth:`finish` after a complete
    run (the final snapshot: every worker's part is its final state), :meth:`fail` on the lead
    when its run failed (the other shards then skip the final snapshot).
    """

    def __init__(
        self,
        cut: BarrierCut,
        host: CutHost,
        directory: str | os.PathLike[str],
        *,
        shard: int,
        shards: int,
        store: dist.Store,
        every_s: float,
        keep: int = 3,
        extra: dict[str, Any] | None = None,
        workers: list[int],
        timeout_s: float = 60.0,
    ) -> None:
        self.cut = cut
        self.host = host
        self.directory = Path(directory)
        self.shard, self.shards = shard, shards
        self.store = store
        self.checkpointer = Checkpointer(self.directory, f"shard{shard}", keep=keep)
        self.log = SnapshotLog(self.directory, keep=keep)
        self.policy = CheckpointPolicy(every_s)
        self.extra = extra or {}
        self.workers = workers
        self.timeout_s = timeout_s
        self.written = 0
        """The newest snapshot whose part this shard has written."""
        self.awaiting: int | None = None
        """Lead: the snapshot started and not committed yet."""
        self.committed: int | None = None

    @staticmethod
    def _key(shard: int) -> str:
        return f"easgd/snapshot/shard{shard}"

    _FINAL = "easgd/snapshot/final"

    def tick(self) -> None:
        """Write copied parts; lead: commit a snapshot every shard has written, start the next."""
        self._write_parts()
        if not self.cut.lead:
            return
        if self.awaiting is not None and self._all_written(self.awaiting):
            self._commit(self.awaiting)
            self.awaiting = None
        if self.awaiting is None and self.policy.due():
            self.awaiting = self.cut.begin()
            self.policy.started()
            self._write_parts()  # at once when no worker is running

    def _write_parts(self) -> None:
        with self.host.lock:
            parts = self.cut.take_parts()
        for number, state in parts:
            self._write(number, state)

    def _write(self, number: int, state: dict[str, Any]) -> None:
        self.checkpointer.save({**state, **self.extra}, number)
        self.written = number
        if not self.cut.lead:
            self.store.set(self._key(self.shard), str(number))

    def _all_written(self, number: int) -> bool:
        if self.written < number:
            return False
        for shard in range(1, self.shards):
            key = self._key(shard)
            if not self.store.check([key]) or int(self.store.get(key)) < number:
                return False
        return True

    def _commit(self, number: int) -> None:
        kept = self.log.commit(number)
        self.committed = number
        names = [f"shard{j}" for j in range(self.shards)] + [f"worker{r}" for r in self.workers]
        for name in names:
            Checkpointer(self.directory, name).prune(kept)

    def finish(self) -> None:
        """After a complete run: the final snapshot (every shard's state now; every worker's
        part is its final state, written before its DONE)."""
        self._write_parts()
        if self.cut.lead:
            with self.host.lock:
                number, state = self.cut.abandon(), self.host.state_copy()
            self.store.set(self._FINAL, str(number))
            self._write(number, state)
            deadline = time.perf_counter() + self.timeout_s
            while not self._all_written(number):
                if time.perf_counter() > deadline:
                    log.warning("final snapshot %d: not every shard wrote its part", number)
                    return
                time.sleep(0.02)
            self._commit(number)
            return
        try:
            self.store.wait([self._FINAL], datetime.timedelta(seconds=self.timeout_s))
        except Exception as err:  # the lead is gone: its restart resumes the last commit
            log.warning("no final snapshot from the lead shard (%s)", err)
            return
        number = int(self.store.get(self._FINAL))
        if number > 0:
            with self.host.lock:
                state = self.host.state_copy()
            self._write(number, state)

    def fail(self) -> None:
        """Lead: the run failed; tell the other shards there is no final snapshot."""
        if self.cut.lead:
            self.store.set(self._FINAL, "0")
