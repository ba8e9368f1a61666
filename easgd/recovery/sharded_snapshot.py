"""Consistent snapshots of a sharded center (``server.shards = k``): the barrier cut.

:class:`BarrierCut` is one shard's side of the cut (how it differs from the single server's
:class:`easgd.recovery.snapshot.SnapshotCut` is in its docstring); both implement
:class:`easgd.recovery.snapshot.SnapshotProtocol` and are driven by the same
:class:`easgd.recovery.snapshot.SnapshotWriter`. :class:`ShardPeers` is what a sharded snapshot
adds to that writer: each shard reports the newest part it wrote through the run's rendezvous
store, and the lead shard commits a snapshot once every shard has written its part. Restarted
shards and workers resume from the newest committed snapshot, as in an unsharded run
(:mod:`easgd.recovery.resume`).
"""

from __future__ import annotations

import datetime
import logging
import threading
import time

import torch.distributed as dist

from easgd.comm.message import Header, Op
from easgd.recovery.snapshot import CutHost, OpenSnapshot, SnapshotProtocol

log = logging.getLogger("easgd")


class BarrierCut(SnapshotProtocol):
    """One shard's side of a consistent snapshot of a sharded center (``server.shards = k``).

    With k shards the single server's cut (:class:`easgd.recovery.snapshot.SnapshotCut`) does not
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

    def __init__(self, *, lead: bool, next_number: int = 1, poll_s: float = 0.05) -> None:
        super().__init__(next_number=next_number)
        self.lead = lead
        self.poll_s = poll_s
        self._changed: threading.Condition | None = None
        self.last_captured = 0
        """The newest snapshot whose part this shard has copied."""

    def bind(self, host: CutHost) -> None:
        """Serve ``host``: its lock guards the cut; tagged messages wait on it."""
        super().bind(host)
        self._changed = threading.Condition(host.lock)

    def _condition(self) -> threading.Condition:
        if self._changed is None:
            raise RuntimeError("BarrierCut.bind(server) must be called before use")
        return self._changed

    def on_message(self, rank: int, header: Header) -> int:
        """Note a worker's message (under the server's lock); returns the number to mark its
        reply with (0: none). A tagged message returns only once this shard's part is copied."""
        host, changed = self._bound(), self._condition()
        snap = self._open
        if header.op == Op.DONE:
            if snap is not None:
                snap.forget(rank)
                self._close_if_complete()
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
            while not self._close_if_complete() and self.last_captured < tag:
                if host.failed():  # this snapshot can never complete: serve the message
                    break
                changed.wait(self.poll_s)
            return 0
        return snap.mark(rank) if snap is not None and self.lead else 0

    def _is_complete(self, snap: OpenSnapshot) -> bool:
        return not snap.missing  # every running worker has crossed the cut here

    def _closing(self, number: int) -> None:
        self._parts.append((number, self._bound().state_copy()))
        self.last_captured = number
        self._condition().notify_all()


class ShardPeers:
    """The shards of one snapshot, seen from shard ``shard``: who wrote which part (the store)."""

    _FINAL = "easgd/snapshot/final"

    def __init__(
        self, store: dist.Store, *, shard: int, shards: int, timeout_s: float = 60.0
    ) -> None:
        self.store = store
        self.shard, self.shards = shard, shards
        self.timeout_s = timeout_s

    @staticmethod
    def _key(shard: int) -> str:
        return f"easgd/snapshot/shard{shard}"

    def report(self, number: int) -> None:
        """This shard has written its part of snapshot ``number`` (the lead's is local)."""
        if self.shard != 0:
            self.store.set(self._key(self.shard), str(number))

    def all_written(self, number: int) -> bool:
        """Lead: whether every other shard has written its part of ``number``."""
        for shard in range(1, self.shards):
            key = self._key(shard)
            if not self.store.check([key]) or int(self.store.get(key)) < number:
                return False
        return True

    def wait_written(self, number: int) -> bool:
        """Lead: wait until every shard has written ``number`` (False after ``timeout_s``)."""
        deadline = time.perf_counter() + self.timeout_s
        while not self.all_written(number):
            if time.perf_counter() > deadline:
                log.warning("final snapshot %d: not every shard wrote its part", number)
                return False
            time.sleep(0.02)
        return True

    def announce_final(self, number: int) -> None:
        """Lead: the final snapshot's number for the other shards (0: none, the run failed)."""
        self.store.set(self._FINAL, str(number))

    def final_number(self) -> int:
        """The lead's final snapshot number (0: none, or the lead is gone)."""
        try:
            self.store.wait([self._FINAL], datetime.timedelta(seconds=self.timeout_s))
        except Exception as err:  # the lead is gone: its restart resumes the last commit
            log.warning("no final snapshot from the lead shard (%s)", err)
            return 0
        return int(self.store.get(self._FINAL))
