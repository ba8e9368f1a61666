"""A parameter server for workers that come and go (``membership=elastic``).

:class:`ElasticServer` serves p *slots* instead of p fixed ranks. Each slot's thread waits for a
member (:class:`easgd.comm.membership.SlotListener`), serves it from its HELLO to its DONE as
:class:`~easgd.engine.server.ParameterServer` serves a fixed worker, and when the member dies
(its group breaks) or hangs (the liveness check, which asks the member's keeper to kill it),
waits for the next one. The center keeps everything the departed member's exchanges gave it.

A new member starts from the center (DOWNPOUR: pulls it, accumulation zero) and continues the
slot's step count from the slot's last exchange (the HELLO reply's ``step``), so the run's stop
rules count what the run has done: a slot is finished once some member of it has taken
``steps_per_worker`` steps. The steps a dead member took after its last exchange are lost (its
replacement takes them again: ``redone_steps``).

Ledger: for every member the server sums, in float64, the center changes its exchanges caused
(EASGD/EAMSGD: the elastic differences; DOWNPOUR and its averaging variants: the pushes). When a
member leaves, its sum is written to ``checkpoints/ledger-slot<s>-<n>.pt``; a member that
finishes writes its own sum (counted on its side) there instead. So, at the end of a run,
center = initial center + the sum of every member's file, whatever joined and left (the audit:
:func:`easgd.analysis.audit.membership_gap`). Memory: 8 bytes per parameter per slot.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from easgd.comm import transport as wire
from easgd.comm.membership import EventLog, SlotListener, free_slots, start_server_epoch
from easgd.comm.message import Header
from easgd.comm.transport import PairTransport
from easgd.engine.server import ParameterServer, PeerLost, Resumed, ServePolicy, WorkerStats
from easgd.recovery.snapshot import SnapshotCut
from easgd.roles import ServerRole

log = logging.getLogger("easgd.server")

MakeTransport = Callable[[int, dist.ProcessGroup], PairTransport]
"""(slot, the member's 2-rank group) -> the server's end of its link."""


LEDGER_BASE = "ledger-base.pt"
"""The center this job's first server started from (float64): the ledgers add up from it."""


def ledger_path(directory: Path, slot: int, member: int) -> Path:
    """Where the ledger of member ``member`` of ``slot`` is kept."""
    return directory / f"ledger-slot{slot}-{member}.pt"


def own_ledger_path(directory: Path, slot: int, member: int) -> Path:
    """Where a finished member leaves the ledger it counted itself (the audit compares)."""
    return directory / f"own-ledger-slot{slot}-{member}.pt"


def recover_center(directory: Path, center: Tensor, *, first_start: bool) -> Tensor:
    """The center a server starts from, in float64.

    A job's first server start keeps ``center`` (initial, or the resumed snapshot's) and writes it
    as the base, dropping ledgers of an earlier job. A server restarted within the job rebuilds
    the center exactly instead: the base plus the ledger of every member that finished or left;
    the members still running add theirs when they rejoin.
    """
    if first_start:
        for stale in directory.glob("ledger-slot*.pt"):
            stale.unlink()
        base = center.to(torch.float64)
        torch.save(base, directory / LEDGER_BASE)
        return base
    total = torch.load(directory / LEDGER_BASE).clone()
    for path in sorted(directory.glob("ledger-slot*.pt")):
        total += torch.load(path)
    return total


@dataclass(frozen=True)
class ServerStart:
    """One start of an elastic run's server, as the job counts it."""

    epoch: int
    """This start's number within the job (1: the job's first server)."""
    restarts: int
    """Restarts of the run so far: earlier attempts' (the resumed snapshot's) + this job's."""
    elapsed_before_s: float
    """Wall time of the job before this start (``max_wall_s`` counts the job's)."""


def start_server(
    store: dist.Store,
    role: ServerRole,
    directory: Path,
    slots: list[int],
    *,
    first_start: bool,
    restarts: int,
    audited: bool,
) -> ServerStart:
    """Recover the center and announce a server start to the members (easgd.train's elastic
    server and ``api.serve`` share it).

    ``audited`` (the rule keeps ledgers): the center is :func:`recover_center`'s (a restart's is
    rebuilt exactly); else it stays as resumed from the snapshot. Every slot is freed (members
    of a dead server claim theirs again) and the next epoch is announced. ``restarts``: those
    of the snapshot the job's first server resumed from."""
    directory.mkdir(parents=True, exist_ok=True)
    if audited:
        center = recover_center(directory, role.center, first_start=first_start)
        role.center.copy_(center.to(role.center.dtype))
    free_slots(store, slots)
    epoch = start_server_epoch(store)
    if epoch == 1:  # the job's first server: restarts of earlier attempts (the snapshot's)
        store.set("run/restarts_before", str(restarts))
    restarts = int(store.get("run/restarts_before")) + epoch - 1  # + this job's server restarts
    job_started = float(store.compare_set("run/started_at", "", repr(time.time())).decode())
    elapsed = max(0.0, time.time() - job_started) if epoch > 1 else 0.0
    return ServerStart(epoch, restarts, elapsed)


class ElasticServer(ParameterServer):
    """Serves ``slots`` with ``role``, each slot's members in turn (see the module docstring)."""

    def __init__(
        self,
        role: ServerRole,
        slots: list[int],
        members: SlotListener,
        make_transport: MakeTransport,
        *,
        ledger_dir: Path,
        slot_wait_s: float,
        ledger: str | None,
        policy: ServePolicy | None = None,
        resumed: Resumed | None = None,
        snapshots: SnapshotCut | None = None,
    ) -> None:
        super().__init__(role, {}, policy, resumed=resumed, snapshots=snapshots)
        steps = resumed.steps if resumed is not None else {}
        self.slots = slots
        self.members = members
        self.make_transport = make_transport
        self.ledger_dir = ledger_dir
        self.slot_wait_s = slot_wait_s
        self.stats = {slot: WorkerStats(steps=steps.get(slot, 0)) for slot in slots}
        self.incarnation: dict[int, int] = {}
        """Each slot's current connection (its incarnation number in the store)."""
        self.member: dict[int, int] = {}
        """Each slot's current member's number (a rejoining member keeps its own)."""
        self.events = EventLog(members.store)
        """The job's joins, departures and redone steps (every server start's)."""
        for row in self.events.rows("redone"):
            if row["slot"] in self.stats:
                self.stats[row["slot"]].redone_steps += row["steps"]
        self._slot_step: dict[int, int] = {}
        self._ledgers: dict[int, Tensor] = {}
        """Per slot, the current member's ledger (None: this rule's center changes are not
        audited, e.g. MDOWNPOUR's server momentum)."""
        self._ledger = ledger
        if ledger == "payload":
            self.before_update.append(self._count_payload)
        elif ledger == "reply":
            self.on_exchange.append(self._count_reply)
            # the center has an exchange whose reply never arrived (its member died): count it
            self.on_unanswered.append(self._count)

    # -- threads ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start one thread per slot (and the role's compiled update, in the background)."""
        self.role.compile_update(part_values=wire.PIECE_VALUES)
        self._threads = {
            slot: threading.Thread(
                target=self._serve_slot, args=(slot,), name=f"slot{slot}", daemon=True
            )
            for slot in self.slots
        }
        for thread in self._threads.values():
            thread.start()

    def _serve_slot(self, slot: int) -> None:
        try:
            while not self._slot_done(slot):
                got = self.members.wait(slot, self.stop, give_up_s=self.slot_wait_s)
                if got is None:
                    if not self.stop.is_set():
                        self._give_up_slot(slot)
                    return
                incarnation, group = got
                self._serve_member(slot, incarnation, group)
        except Exception as err:  # the server's own code
            self.fail(err)
        finally:
            for hook in self.on_worker_end:
                hook(slot)

    def _give_up_slot(self, slot: int) -> None:
        """Nobody came for the slot in ``slot_wait_s``: the run goes on with the others, whatever
        ``worker_failure`` says (the slot is listed in ``failed_workers``)."""
        self.stats[slot].failed = f"no member came for {self.slot_wait_s:g} s"
        self._drop(slot)
        log.warning(
            "slot %d: no member came for %g s; the run goes on with the others",
            slot,
            self.slot_wait_s,
        )

    def _slot_done(self, slot: int) -> bool:
        stats = self.stats[slot]
        return stats.finished or stats.failed is not None or self.server_error is not None

    def _serve_member(self, slot: int, incarnation: int, group: dist.ProcessGroup) -> None:
        self.transports[slot] = self.make_transport(slot, group)
        self.incarnation[slot] = self.member[slot] = incarnation
        if self._ledger is not None:
            self._ledgers[slot] = torch.zeros(self.role.center.numel(), dtype=torch.float64)
        self.links.pop(slot, None)
        for hook in self.on_member_join:
            hook(slot)
        log.info("slot %d: a member connected (connection %d)", slot, incarnation)
        try:
            self._serve_worker(slot)
        except PeerLost as err:
            self._member_left(slot, incarnation, str(err))
            return
        except Exception:
            self._tell_server_failed(slot)
            raise
        finally:
            self.stats[slot].in_service = False
            self.members.release(slot, finished=self.stats[slot].finished)
        if self.stats[slot].failed is None and not self.stats[slot].finished:
            self._member_left(slot, incarnation, "left")

    def _save_ledger(self, slot: int) -> None:
        """Write the slot's current member's ledger (it leaves, or says DONE)."""
        ledger = self._ledgers.pop(slot, None)
        if ledger is not None:
            torch.save(ledger, ledger_path(self.ledger_dir, slot, self.member[slot]))

    def _done(
        self, rank: int, transport: PairTransport, header: Header, payload: Tensor | None
    ) -> None:
        """A member's DONE: its ledger is written before DONE is acknowledged (a member whose
        acknowledgement is lost rejoins, and its ledger is not counted twice)."""
        self._save_ledger(rank)
        super()._done(rank, transport, header, payload)

    def _member_left(self, slot: int, incarnation: int, why: str) -> None:
        stats = self.stats[slot]
        why = why.split(". This is typically")[0]  # gloo's closed connection: its first sentence
        self._save_ledger(slot)
        self.events.add(
            "left", slot=slot, incarnation=incarnation, step=stats.steps, time=time.time()
        )
        self.lost.discard(slot)
        log.warning(
            "slot %d: member %d left at step %d (%s); waiting for a replacement",
            slot,
            incarnation,
            stats.steps,
            why,
        )
        for hook in self.on_worker_end:
            hook(slot)

    # -- the protocol's differences -----------------------------------------------------------
    def _hello(self, rank: int, transport: PairTransport, header: Header) -> None:
        """As a fixed worker's HELLO, but the reply's ``step`` is where the slot goes on from;
        the HELLO's ``step`` is where the slot's previous process had got to (its step marker),
        so the steps in between are taken again (``redone_steps``). A member rejoining a
        restarted server (``header.ledger``) sends its ledger first: the center gets it back,
        and the member goes on from its own step with its own parameters."""
        stats = self.stats[rank]
        self.member[rank] = header.member or self.incarnation[rank]
        self.events.add("join", slot=rank, member=self.member[rank], time=time.time(),
                        rejoin=bool(header.ledger))  # fmt: skip
        if header.ledger:
            self._take_back(rank, transport)
            self._slot_step[rank] = stats.steps = header.step
            super()._hello(rank, transport, header)
            stats.steps = header.step
            return
        slot_step = self._slot_step[rank] = stats.steps
        super()._hello(rank, transport, header)
        stats.steps = slot_step
        redone = max(0, header.step - slot_step)
        stats.redone_steps += redone
        if redone:
            self.events.add("redone", slot=rank, steps=redone)

    def _take_back(self, rank: int, transport: PairTransport) -> None:
        """Receive a rejoining member's ledger and add it to the center (and to its ledger)."""
        ledger = torch.zeros(self.role.center.numel(), dtype=torch.float64)
        try:
            transport.recv_tensor(ledger)
        except Exception as err:
            raise PeerLost(f"{type(err).__name__}: {err}") from err
        if ledger_path(self.ledger_dir, rank, self.member[rank]).exists():
            log.info(
                "slot %d: member %d rejoined; its ledger was counted already",
                rank,
                self.member[rank],
            )
            self._ledgers.pop(rank, None)
            return
        with self.lock:
            self.role.center.add_(ledger.to(self.role.center.dtype))
        if self._ledger is not None:
            self._ledgers[rank] = ledger
        log.info("slot %d: its member rejoined; its ledger is back in the center", rank)

    def _reply_step(self, rank: int) -> int:
        return self._slot_step[rank]

    def _count_payload(self, rank: int, payload: Tensor | None) -> None:
        if payload is not None and rank in self._ledgers:
            self._ledgers[rank] += payload.reshape(-1).to(torch.float64)

    def _count_reply(self, rank: int, header: Header, reply: Tensor, staleness: int) -> None:
        self._count(rank, reply)

    def _count(self, rank: int, change: Tensor) -> None:
        """Add a change this slot's member caused in the center to its ledger."""
        if rank in self._ledgers:
            self._ledgers[rank] += change.reshape(-1).to(torch.float64)

    def _failed(self, rank: int, header: Header) -> None:
        """A member that raised: under fail_fast the run stops; else it leaves like one that
        died (the slot waits for the next)."""
        if not self.policy.continue_on_failure:
            super()._failed(rank, header)
            return
        self.stats[rank].steps = max(self.stats[rank].steps, header.step)
        log.warning("slot %d: member left after an exception at step %d", rank, header.step)

    def membership_figures(self) -> dict[str, object]:
        """What summary.json says about the members, over every server start of the job: joins
        (new members), rejoins (live members back at a restarted server), departures, and
        ``rejoin_s``: from each departure to its slot's next join."""
        joins, departures = self.events.rows("join"), self.events.rows("left")
        rejoin_s = []
        for gone in departures:
            later = [
                j["time"] for j in joins if j["slot"] == gone["slot"] and j["time"] >= gone["time"]
            ]
            if later:
                rejoin_s.append(round(min(later) - gone["time"], 4))
        new = [j for j in joins if not j["rejoin"]]
        return {
            "mode": "elastic",
            "members_joined": len(new),
            "members_left": len(departures),
            "members_rejoined": len(joins) - len(new),
            "departures": departures,
            "joins_by_slot": {str(s): sum(j["slot"] == s for j in new) for s in self.slots},
            "rejoin_s": rejoin_s,
        }

    def declare_lost(self, rank: int, reason: str) -> None:
        """A hung member: its keeper is asked to kill it, which breaks its group (then the slot
        waits for the next member)."""
        log.warning("slot %d: member hung (%s); asking its keeper to replace it", rank, reason)
        self.members.evict(rank)

    def running_workers(self) -> list[int]:
        """No worker is part of a snapshot: with members coming and going, a snapshot is the
        server's state alone (a whole-job restart starts every worker from the center)."""
        return []
