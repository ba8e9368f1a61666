"""Consistent snapshots of a whole run (the server and every worker) by a marker-based cut.

A checkpoint of p + 1 processes is only useful if it is one state the run could have been in:
the server's center must contain exactly the exchanges that the workers' saved states have
applied (otherwise EASGD's center + sum of x_i is off by an elastic move, and a DOWNPOUR push is
applied twice or lost). The cut used here:

1. The server starts snapshot k (under its lock): it copies its own state and notes the workers
   still running.
2. Each such worker's first message after that is counted into snapshot k: the server marks its
   reply with k. The worker saves the state it had when it sent that message (before applying
   the reply): every exchange it had applied before was served before the server's copy, and
   this one was served after it, so both sides agree on which exchanges happened.
3. The worker says so (``saved_snapshot``) in its next message; a worker whose first message
   after the start is DONE has already written its final state, before sending DONE.
4. When every worker has saved its part, the server commits k (``committed.json``). A restart
   resumes every process from the newest committed snapshot; pushes, elastic moves and steps
   made after it are redone exactly once.

A worker that had finished before the start is represented by its final state. Snapshot numbers
grow across restarts (a restarted server starts above every file on disk), so a stale file from
an uncommitted snapshot of a crashed attempt is never mistaken for a committed one.

One protocol, one writer: :class:`SnapshotProtocol` is what the server side of any cut does
(this module's :class:`SnapshotCut`, and the sharded center's
:class:`~easgd.recovery.sharded_snapshot.BarrierCut`); :class:`SnapshotWriter` drives either on a
:class:`CheckpointPolicy` for ``easgd.train``'s server, its shards and ``easgd.api.serve``.
:class:`WorkerSnapshots` is a worker's side (``easgd.train`` workers and ``api.ElasticOptimizer``).
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from easgd.algorithms.registry import spec_of
from easgd.comm.message import Header, Op
from easgd.recovery.checkpoint import Checkpointer
from easgd.recovery.files import atomic_write


@dataclass
class OpenSnapshot:
    """A snapshot in progress on one server (or shard): which workers it still waits for."""

    number: int
    unmarked: set[int] = field(default_factory=set)
    """Workers whose reply is still to be marked (their first message since the start)."""
    missing: set[int] = field(default_factory=set)
    """Workers whose part is still missing: one server: not yet confirmed on disk; a shard:
    not yet across the cut (tagged message or DONE)."""

    def mark(self, rank: int) -> int:
        """The number to mark this worker's reply with: this snapshot's, the first time (else 0)."""
        if rank not in self.unmarked:
            return 0
        self.unmarked.discard(rank)
        return self.number

    def forget(self, rank: int) -> None:
        """The worker's part needs nothing more (it said DONE, failed or was lost)."""
        self.unmarked.discard(rank)
        self.missing.discard(rank)


class CutHost(Protocol):
    """What a cut needs from its host, the run's supervisor (see :meth:`SnapshotProtocol.bind`
    and :class:`easgd.engine.supervisor.Supervisor`)."""

    lock: threading.Lock

    def running_workers(self) -> list[int]:
        """Workers neither finished nor failed nor lost (call under ``lock``)."""
        ...

    def state_copy(self) -> dict[str, Any]:
        """A copy of the server's state as a snapshot part (call under ``lock``)."""
        ...

    def failed(self) -> bool:
        """Whether the run is ending on a failure (no snapshot can complete any more)."""
        ...


class SnapshotProtocol:
    """The server side of a consistent snapshot, as both cuts implement it.

    A cut is bound to its server (:meth:`bind`); the lead (the single server, or shard 0) starts
    snapshot n over the running workers (:meth:`begin`); every worker message passes through
    :meth:`on_message`, which says which reply to mark with n; a failed or lost worker is
    :meth:`drop` ped. The server's own part is copied under the lock when the cut decides
    (:class:`SnapshotCut`: at the start; :class:`~easgd.recovery.sharded_snapshot.BarrierCut`:
    once every worker has crossed) and handed to the writer by :meth:`take_parts`;
    :meth:`complete` reports a snapshot whose parts at this server are all in, and
    :meth:`abandon` ends the run's snapshots (the final one's number). Every method but
    :meth:`bind` is called under the server's lock. :class:`SnapshotWriter` drives both cuts.
    """

    lead = True
    """Whether this server starts (and commits) snapshots."""

    def __init__(self, *, next_number: int = 1) -> None:
        self.next_number = next_number
        self._host: CutHost | None = None
        self._open: OpenSnapshot | None = None
        self._parts: list[tuple[int, dict[str, Any]]] = []
        self._completed: int | None = None

    def bind(self, host: CutHost) -> None:
        """Serve ``host``: its state is this server's part of each snapshot."""
        self._host = host

    def _bound(self) -> CutHost:
        if self._host is None:
            raise RuntimeError(f"{type(self).__name__}.bind(server) must be called before use")
        return self._host

    @property
    def in_progress(self) -> bool:
        """Whether a snapshot has started (or been seen) here and is not complete yet."""
        return self._open is not None

    def begin(self, running: Iterable[int]) -> int:
        """Start the next snapshot over the ``running`` workers; returns its number."""
        if not self.lead:
            raise RuntimeError("only the lead shard starts snapshots")
        if self._open is not None:
            raise RuntimeError(f"snapshot {self._open.number} is still in progress")
        number, self.next_number = self.next_number, self.next_number + 1
        ranks = set(running)
        self._open = OpenSnapshot(number, set(ranks), set(ranks))
        self._opened(number)
        self._close_if_complete()
        return number

    def on_message(self, rank: int, header: Header) -> int:
        """Note a worker's message; returns the snapshot number to mark its reply with (0: none)."""
        raise NotImplementedError

    def drop(self, rank: int) -> None:
        """A worker failed or was lost (continue policy): the snapshot goes on without it."""
        if self._open is not None:
            self._open.forget(rank)
            self._close_if_complete()

    def complete(self) -> int | None:
        """The newest snapshot completed here since the last call (None: none)."""
        number, self._completed = self._completed, None
        return number

    def take_parts(self) -> list[tuple[int, dict[str, Any]]]:
        """This server's parts copied since the last call, to write to disk off the lock."""
        parts, self._parts = self._parts, []
        return parts

    def abandon(self) -> int:
        """At the end of a run: drop any open snapshot; returns the number for the final one."""
        self._open = None
        number, self.next_number = self.next_number, self.next_number + 1
        return number

    def _opened(self, number: int) -> None:
        """Snapshot ``number`` has just started here."""

    def _is_complete(self, snap: OpenSnapshot) -> bool:
        return not snap.unmarked and not snap.missing

    def _close_if_complete(self) -> bool:
        snap = self._open
        if snap is None or not self._is_complete(snap):
            return False
        self._closing(snap.number)
        self._open, self._completed = None, snap.number
        return True

    def _closing(self, number: int) -> None:
        """Snapshot ``number`` is complete here and about to close."""


class SnapshotCut(SnapshotProtocol):
    """The single server's cut: its part is copied at the start, workers' parts follow.

    The server's state is copied when the snapshot starts; each running worker's reply to its
    first message after that is marked, and the snapshot is complete when every such worker has
    confirmed its part on disk (``saved_snapshot`` in its next message) or said DONE.
    """

    def _opened(self, number: int) -> None:
        self._parts.append((number, self._bound().state_copy()))

    def on_message(self, rank: int, header: Header) -> int:
        """Note a worker's message; returns the snapshot number to mark its reply with (0: none)."""
        snap = self._open
        if snap is None:
            return 0
        if header.saved_snapshot >= snap.number:
            snap.missing.discard(rank)
        if header.op == Op.DONE:  # its final state was written before DONE was sent
            snap.forget(rank)
            mark = 0
        else:
            mark = snap.mark(rank)
        self._close_if_complete()
        return mark


class SnapshotLog:
    """The committed snapshots of a run: ``committed.json`` in the checkpoint folder."""

    def __init__(self, directory: str | os.PathLike[str], *, keep: int = 3) -> None:
        self.directory = Path(directory)
        self.keep = keep
        self.path = self.directory / "committed.json"

    def committed(self) -> list[int]:
        """Committed snapshot numbers, oldest first (empty: none)."""
        if not self.path.is_file():
            return []
        return [int(n) for n in json.loads(self.path.read_text())["snapshots"]]

    def commit(self, number: int) -> list[int]:
        """Record snapshot ``number`` as complete; returns the ``keep`` newest committed ones."""
        kept = (
            [n for n in self.committed() if n < number][-(self.keep - 1) :] if self.keep > 1 else []
        )
        kept.append(number)
        atomic_write(self.path, json.dumps({"snapshots": kept}) + "\n")
        return kept

    def newest(self) -> int | None:
        """The newest committed snapshot (None: none)."""
        committed = self.committed()
        return committed[-1] if committed else None

    def next_number(self) -> int:
        """The number a (restarted) run's first snapshot takes: above every file on disk."""
        return self.highest_file_number() + 1

    def highest_file_number(self) -> int:
        """The highest snapshot number of any checkpoint file in the folder (0: none)."""
        pattern = re.compile(r"^[a-z0-9]+-(\d+)\.pt$")
        numbers = [0]
        if self.directory.is_dir():
            for path in self.directory.iterdir():
                match = pattern.match(path.name)
                if match:
                    numbers.append(int(match.group(1)))
        return max(numbers)


class WorkerSnapshots:
    """Worker side: what to save (``capture``) and where; remembers the newest saved number."""

    def __init__(
        self,
        checkpointer: Checkpointer,
        capture: Callable[[], dict[str, Any]],
        *,
        after_reply: bool = False,
    ) -> None:
        self.checkpointer = checkpointer
        self.capture = capture
        """A copy of this worker's state now (role, sampler, ...), to save if the reply is marked."""
        self.after_reply = after_reply
        """Which state a marked reply saves: False (one server, :class:`SnapshotCut`): the state
        when the marked exchange was sent; True (shards, :class:`BarrierCut`): the state with
        the marked reply applied."""
        self.saved = 0
        """The newest snapshot number saved to disk (sent back to the server as an ack)."""

    def save(self, number: int, state: dict[str, Any]) -> None:
        """Save ``state`` as this worker's part of snapshot ``number``."""
        self.checkpointer.save(state, number)
        self.saved = number

    def save_final(self) -> None:
        """Save the state as it is now, before DONE is sent."""
        self.checkpointer.save_final(self.capture())


class StepMarker:
    """The newest step a worker has computed, in a memory-mapped file that survives ``kill -9``.

    Writing it is one 8-byte store into the page cache per step (no system call), so it is exact
    at any kill of the process. On resume the difference to the resumed step is the work redone.
    """

    _LAYOUT = struct.Struct("<qq")  # newest step, redone steps accumulated over restarts

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size < self._LAYOUT.size:
                os.ftruncate(fd, self._LAYOUT.size)
            self._map = mmap.mmap(fd, self._LAYOUT.size)
        finally:
            os.close(fd)

    def start(self, step: int, *, resumed: bool) -> int:
        """Begin at ``step``; returns the steps redone over all restarts (0 on a fresh start)."""
        previous_step, previous_redone = self._LAYOUT.unpack_from(self._map, 0)
        redone = previous_redone + max(0, previous_step - step) if resumed else 0
        self._LAYOUT.pack_into(self._map, 0, step, redone)
        return int(redone)

    def reached(self) -> int:
        """The step the marker's last process had reached (0 for a new marker)."""
        return int(self._LAYOUT.unpack_from(self._map, 0)[0])

    def mark(self, step: int) -> None:
        """This step has been computed."""
        struct.pack_into("<q", self._map, 0, step)

    def close(self) -> None:
        """Release the mapping."""
        self._map.close()


class CheckpointPolicy:
    """When to start the next snapshot: every ``every_s`` seconds (0: only at the end)."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self._last = time.perf_counter()

    def due(self) -> bool:
        """Whether a periodic snapshot is due now."""
        return bool(self.every_s) and time.perf_counter() - self._last >= self.every_s

    def started(self) -> None:
        """A snapshot has just started."""
        self._last = time.perf_counter()


class Peers(Protocol):
    """The other shards of a sharded center, as the writer sees them
    (:class:`~easgd.recovery.sharded_snapshot.ShardPeers`: through the rendezvous store)."""

    def report(self, number: int) -> None:
        """This shard has written its part of snapshot ``number``."""
        ...

    def all_written(self, number: int) -> bool:
        """Whether every shard has written its part of ``number`` (no wait)."""
        ...

    def wait_written(self, number: int) -> bool:
        """Wait (bounded) until every shard has written ``number``; whether they did."""
        ...

    def announce_final(self, number: int) -> None:
        """Lead: the final snapshot's number (0: the run failed, there is none)."""
        ...

    def final_number(self) -> int:
        """The final snapshot's number the lead announced (0: none)."""
        ...


class SnapshotWriter:
    """Drives a cut: starts snapshots on a :class:`CheckpointPolicy`, writes this server's parts,
    and commits complete snapshots to the :class:`SnapshotLog`.

    One writer serves every topology. The single server (``peers=None``) commits a snapshot once
    its cut reports it complete. A shard reports each part it wrote to its ``peers``; the lead
    shard commits once every shard has written (:class:`~easgd.recovery.sharded_snapshot.ShardPeers`).
    Call :meth:`tick` from the server's main loop, :meth:`finish` after a complete run (the final
    snapshot: every worker's part is its final state, written before its DONE) and :meth:`fail`
    when the run failed.
    """

    def __init__(
        self,
        cut: SnapshotProtocol,
        host: CutHost,
        directory: str | os.PathLike[str],
        *,
        every_s: float,
        names: list[str],
        name: str = "server",
        keep: int = 3,
        extra: dict[str, Any] | None = None,
        peers: Peers | None = None,
    ) -> None:
        self.cut, self.host, self.peers = cut, host, peers
        self.directory = Path(directory)
        self.names = names
        """Every process's checkpoint name (server or shards, workers), pruned at each commit."""
        self.checkpointer = Checkpointer(self.directory, name, keep=keep)
        self.log = SnapshotLog(self.directory, keep=keep)
        self.policy = CheckpointPolicy(every_s)
        self.extra = extra or {}
        self.lead = cut.lead
        self.written = 0
        """The newest snapshot whose part this server has written."""
        self.pending: int | None = None
        """Lead: a snapshot complete here, committed once every part is written."""
        self.committed: int | None = None

    def tick(self) -> None:
        """Write copied parts and commit what is complete; start the next snapshot when due."""
        self._collect()
        if self.lead and self.pending is None and self.policy.due():
            self.start()

    def start(self) -> None:
        """Lead: start a snapshot now (unless one is open or the run is failing)."""
        with self.host.lock:
            if self.cut.in_progress or self.host.failed():
                return
            self.cut.begin(self.host.running_workers())
        self.policy.started()
        self._collect()  # at once when no worker is running

    def finish(self) -> None:
        """After a complete run: commit what is complete, then write (and commit) the final one."""
        self._collect()
        if self.lead:
            with self.host.lock:
                number, state = self.cut.abandon(), self.host.state_copy()
            if self.peers is not None:
                self.peers.announce_final(number)
        else:
            number = self.peers.final_number() if self.peers is not None else 0
            if not number:
                return
            with self.host.lock:
                state = self.host.state_copy()
        self._write(number, state)
        if self.lead and (self.peers is None or self.peers.wait_written(number)):
            self._commit(number)

    def fail(self) -> None:
        """The run failed: no final snapshot (the other shards stop waiting for one)."""
        if self.lead and self.peers is not None:
            self.peers.announce_final(0)

    def _collect(self) -> None:
        with self.host.lock:
            parts = self.cut.take_parts()
            done = self.cut.complete()
        for number, state in parts:
            self._write(number, state)
        if self.lead and done is not None:
            self.pending = done
        pending = self.pending
        if pending is not None and self.written >= pending and self._all_written(pending):
            self._commit(pending)

    def _all_written(self, number: int) -> bool:
        return self.peers is None or self.peers.all_written(number)

    def _write(self, number: int, state: dict[str, Any]) -> None:
        self.checkpointer.save({**state, **self.extra}, number)
        self.written = number
        if self.peers is not None:
            self.peers.report(number)

    def _commit(self, number: int) -> None:
        kept = self.log.commit(number)
        self.committed, self.pending = number, None
        for name in self.names:
            Checkpointer(self.directory, name).prune(kept)


class Ledger:
    """The sum (float64) of the center changes one worker's exchanges caused, for audits.

    EASGD/EAMSGD: the elastic differences e it received (the center moved by +e); DOWNPOUR and its
    averaging variants: the accumulations it pushed. With consistent snapshots, a snapshot's
    center equals the initial center plus the sum of every worker's ledger in that snapshot.
    :meth:`attach` subscribes it to a worker loop's sends and its role's applied replies (a reply
    the server refused resets the worker instead: the center did not move, nothing is counted).
    """

    def __init__(self, role: Any, algorithm: str) -> None:
        spec = spec_of(algorithm)
        spec.check_ledger()  # what is audited is the registry's call (spec.ledger)
        self.total = torch.zeros(role.params.numel(), dtype=torch.float64)
        self._uses_reply = spec.ledger == "reply"
        self._sent: torch.Tensor | None = None

    def attach(self, loop: Any) -> None:
        """Count every exchange of ``loop`` (a :class:`easgd.engine.worker.WorkerLoop`)."""
        if not self._uses_reply:
            loop.on_send.append(self._note_sent)
        loop.role.before_reply.append(self._count)

    def _note_sent(self, payload: torch.Tensor | None) -> None:
        self._sent = payload

    def _count(self, role: Any, reply: torch.Tensor) -> None:
        # called before the role applies the reply: in-place roles reuse these buffers
        change = reply if self._uses_reply else self._sent
        assert change is not None, "a DOWNPOUR reply without a push"
        self.total += change.detach().reshape(-1).to("cpu", torch.float64)
