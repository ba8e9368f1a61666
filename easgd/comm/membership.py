"""Workers that come and go: slots, join and a fresh 2-rank process group per member.

With ``membership=elastic`` the server does not share one process group with a fixed roster.
Each of the p worker *slots* is served by its own thread, and whoever holds a slot talks to the
server over a 2-rank gloo group of its own, made over the rendezvous store under a prefix that
names the slot and the member's *incarnation* (``member/<slot>/<n>/``), as torchft's parameter
server gives every client session a fresh group. A member that dies breaks only its own group
(gloo reports the closed connection at once); the slot's thread then waits for the next member.

The store protocol (keys under the run's generation prefix):

- ``member/<slot>/owner``: the id of the process holding the slot, ``""`` when free. A process
  claims a slot with one ``compare_set`` from ``""``, so two processes never hold one slot; the
  server frees it when its member leaves (dies, hangs or finishes).
- ``server/epoch``: a counter the server takes the next number of at every start (a server
  restarted by its keeper is a new epoch), then sets ``server/up<e>``. A member waits for that
  key before it joins, and for ``server/up<e+1>`` when its server of epoch e is gone.
- ``member/<slot>/incarnation``: a counter; a member takes the next number (``add``) after it
  holds the slot, then sets ``member/<slot>/join<n>`` to ``<its id>@<server epoch>``. The server's
  thread for the slot waits for that key (of its own epoch) and makes the group's rank 0 while
  the member makes rank 1.
- ``member/evict/<slot>``: set by the server when it declares a member hung; the process that
  keeps the slot (:mod:`easgd.topologies.keeper`) kills the hung one, so its group breaks too.
- ``run/over``: set when the run has ended; a member arriving afterwards leaves quietly.
- ``run/started_at``: the wall time of the job's first server start (a restarted server's
  ``max_wall_s`` counts from it); ``run/restarts_before``: the restarts of earlier attempts of
  the run (from the snapshot the job's first server resumed), to which each server restart adds.
- ``events/<kind>``: the job's membership events (``join``, ``left``, ``redone``), one JSON row
  per line, appended by whichever server start saw them (:class:`EventLog`), so a restarted
  server's summary counts what happened before it.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

log = logging.getLogger("easgd.membership")

SERVER_END, MEMBER_END = 0, 1
"""Ranks inside a member's 2-rank group: the server is 0, the member 1."""

POLL_S = 0.05
"""How often a waiting slot thread checks whether the run is stopping."""


class SlotRefused(RuntimeError):
    """No slot could be had: every one of the p slots is held (or the run is over)."""


class RunOver(RuntimeError):
    """The run has ended; a member arriving now has nothing to join."""


class SlotFinished(RunOver):
    """Every slot this process may take has finished its budget (its member said DONE): a
    member started after that (its predecessor died on its way out) has nothing to do."""


def _owner(slot: int) -> str:
    return f"member/{slot}/owner"


def _group(store: dist.Store, slot: int, incarnation: int, rank: int, timeout_s: float) -> Any:
    prefix = dist.PrefixStore(f"member/{slot}/{incarnation}/", store)
    timeout = datetime.timedelta(seconds=timeout_s)
    return dist.ProcessGroupGloo(prefix, rank, 2, timeout)


def run_over(store: dist.Store) -> bool:
    """Whether the run has been marked over."""
    return bool(store.check(["run/over"]))


def mark_run_over(store: dist.Store) -> None:
    """Tell members that arrive from now on that there is nothing left to join."""
    store.set("run/over", "1")


def free_slots(store: dist.Store, slots: Iterable[int]) -> None:
    """A server starts: every slot is free (members of a dead server claim theirs again)."""
    for slot in slots:
        store.set(_owner(slot), "")


def server_epoch(store: dist.Store) -> int:
    """The newest server start (0: none yet)."""
    return int(store.add("server/epoch", 0))


def start_server_epoch(store: dist.Store) -> int:
    """A server starts: its epoch number, announced to waiting members."""
    epoch = int(store.add("server/epoch", 1))
    store.set(f"server/up{epoch}", "1")
    return epoch


def wait_for_server(store: dist.Store, *, after: int, timeout_s: float) -> int:
    """Wait until a server newer than epoch ``after`` is up (at most ``timeout_s``); its epoch."""
    deadline = time.perf_counter() + timeout_s
    while True:
        if run_over(store):
            raise RunOver("the run has ended; nothing to join")
        epoch = server_epoch(store)
        if epoch > after:
            return epoch
        if time.perf_counter() > deadline:
            raise TimeoutError(f"no server came up within {timeout_s:g} s (membership.slot_wait_s)")
        time.sleep(POLL_S)


@dataclass(frozen=True)
class Member:
    """A worker process's hold on a slot, and its group with the server."""

    slot: int
    incarnation: int
    group: Any
    member_id: str
    epoch: int
    """The server start this member joined."""


def _finished(slot: int) -> str:
    return f"member/{slot}/finished"


def claim(store: dist.Store, slots: list[int], member_id: str) -> int | None:
    """Claim the first free slot of ``slots`` that has not finished (None: every one is held).
    Raises :class:`SlotFinished` when every one of ``slots`` has finished."""
    open_ = [slot for slot in slots if not store.check([_finished(slot)])]
    if not open_:
        names = ", ".join(map(str, slots))
        raise SlotFinished(f"slot {names} has finished its budget; nothing left to do")
    for slot in open_:
        held = store.compare_set(_owner(slot), "", member_id).decode()
        if held == member_id:
            return slot
    return None


def join(
    store: dist.Store,
    slots: list[int],
    *,
    workers: int,
    timeout_s: float,
    claim_wait_s: float = 0.0,
    after_epoch: int = 0,
    member_id: str | None = None,
) -> Member:
    """Wait for a server newer than ``after_epoch``, claim a slot (the first free one of
    ``slots``, waiting up to ``claim_wait_s`` for one to be freed), take its next incarnation and
    connect.

    Raises :class:`SlotRefused` when every slot stays held and :class:`RunOver` when the run ended.
    """
    epoch = wait_for_server(store, after=after_epoch, timeout_s=timeout_s)
    member_id = member_id or f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    deadline = time.perf_counter() + claim_wait_s
    while (slot := claim(store, slots, member_id)) is None:
        if run_over(store):
            raise RunOver("the run has ended; nothing to join")
        if time.perf_counter() >= deadline:
            raise SlotRefused(
                f"all {workers} worker slots are held (workers={workers} is the target size): a "
                "worker beyond it is refused; raise workers= for a larger run, or stop one first"
            )
        time.sleep(POLL_S)
    incarnation = int(store.add(f"member/{slot}/incarnation", 1))
    store.set(f"member/{slot}/join{incarnation}", f"{member_id}@{epoch}")
    group = _group(store, slot, incarnation, MEMBER_END, timeout_s)
    return Member(slot, incarnation, group, member_id, epoch)


class EventLog:
    """Membership events of the whole job, kept in the store (which outlives every server start).

    Kinds: ``join`` (slot, member, time, rejoin: whether a live member came back to a restarted
    server), ``left`` (slot, incarnation, step, time) and ``redone`` (slot, steps).
    """

    def __init__(self, store: dist.Store) -> None:
        self.store = store

    def add(self, kind: str, **row: Any) -> None:
        """Append one event (an atomic store append: slot threads may add at once)."""
        # Store.append is in torch (c10d) but not in its type stubs
        self.store.append(f"events/{kind}", json.dumps(row) + "\n")  # type: ignore[attr-defined]

    def rows(self, kind: str) -> list[dict[str, Any]]:
        """Every event of ``kind`` so far, oldest first."""
        key = f"events/{kind}"
        if not self.store.check([key]):
            return []
        return [json.loads(line) for line in self.store.get(key).decode().splitlines() if line]


class SlotListener:
    """Server side: waits for each slot's next member and connects to it."""

    def __init__(self, store: dist.Store, *, epoch: int, timeout_s: float) -> None:
        self.store = store
        self.epoch = epoch
        self.timeout_s = timeout_s
        self._served: dict[int, int] = {}

    def wait(
        self, slot: int, stop: threading.Event, *, give_up_s: float
    ) -> tuple[int, dist.ProcessGroup] | None:
        """The slot's next member: (incarnation, group), or None once ``stop`` is set or nobody
        has come for ``give_up_s`` seconds."""
        deadline = time.perf_counter() + give_up_s
        while not stop.is_set() and time.perf_counter() < deadline:
            latest = int(self.store.add(f"member/{slot}/incarnation", 0))
            key = f"member/{slot}/join{latest}"
            if latest > self._served.get(slot, 0) and self.store.check([key]):
                self._served[slot] = latest
                if not self.store.get(key).decode().endswith(f"@{self.epoch}"):
                    continue  # it joined an earlier server start: gone, or joining again
                return latest, _group(self.store, slot, latest, SERVER_END, self.timeout_s)
            time.sleep(POLL_S)
        return None

    def release(self, slot: int, *, finished: bool = False) -> None:
        """The slot's member left: the slot is free for the next one; or, ``finished``, it has
        done the slot's budget and no member is taken for it again."""
        if finished:
            self.store.set(_finished(slot), "1")
        self.store.set(_owner(slot), "")
        self.store.delete_key(f"member/evict/{slot}")

    def evict(self, slot: int) -> None:
        """Ask the keeper of ``slot`` to kill its (hung) member."""
        self.store.set(f"member/evict/{slot}", "1")


def eviction_requested(store: dist.Store, slot: int) -> bool:
    """Whether the server asked for the member of ``slot`` to be killed."""
    return bool(store.check([f"member/evict/{slot}"]))
