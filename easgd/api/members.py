"""Own-loop workers that come and go: ``easgd.train``'s elastic membership for ``api.serve`` and
:class:`~easgd.api.ElasticOptimizer`.

The protocol is :mod:`easgd.comm.membership`'s and the server :class:`~easgd.engine.members.
ElasticServer`: rank 0 serves p slots, a worker claims the slot of its rank, opens its own
2-rank group with the server and says HELLO with the step its slot's previous process reached;
it starts from the center at the slot's step (DOWNPOUR: pulls it, accumulation zero). Each
process is kept by :func:`easgd.api.keeper`, so a worker that dies is started again and its
replacement joins the running server; a server that dies is started again, rebuilds the center
from the base and the ledgers (:func:`~easgd.engine.members.start_server`) and its live workers
rejoin it with their own state (:func:`~easgd.topologies.elastic.rejoin`).

This module holds only what the own-loop API adds: the server's slots over the user's model
(:func:`slot_server`), and a worker's hold on its slot (:class:`SlotMember`: the join, the step
marker, the ledger, the link that outlives the server, the own ledger left at the end).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from easgd.algorithms.registry import spec_of
from easgd.api.keeper import mark_started
from easgd.api.session import Session
from easgd.comm.compression import Compression
from easgd.comm.groups import SERVER_RANK, LaunchError
from easgd.comm.membership import MEMBER_END, Member, RunOver, SlotListener, join
from easgd.comm.transport import PairTransport, WorkerTransport, pair_transport
from easgd.engine.members import ElasticServer, own_ledger_path
from easgd.engine.server import Resumed, ServePolicy
from easgd.engine.worker import WorkerLoop, hello
from easgd.recovery.snapshot import Ledger, SnapshotCut, StepMarker
from easgd.roles import ServerRole, WorkerRole
from easgd.topologies.elastic import RejoiningLink, rejoin

log = logging.getLogger("easgd")

NO_DEADLINE_S = 7 * 24 * 3600.0
"""A slot's receive timeout on the server: a member's liveness is the heartbeat's call."""


def slot_server(
    session: Session,
    role: ServerRole,
    algorithm: str,
    *,
    epoch: int,
    directory: Path,
    slot_wait_s: float,
    compression: Compression | None,
    dtype: torch.dtype,
    policy: ServePolicy,
    resumed: Resumed,
    snapshots: SnapshotCut | None,
) -> ElasticServer:
    """``api.serve``'s server under elastic membership: one slot per worker rank 1..p, each
    member over its own group (the ledgers go to ``directory``)."""
    assert session.store is not None, "elastic membership runs over the rendezvous store"
    numel = role.center.numel()

    def make_transport(slot: int, group: Any) -> PairTransport:
        transport = pair_transport(
            compression, peer=MEMBER_END, group=group, numel=numel, dtype=dtype, direct=True
        )
        transport.recv_timeout_s = NO_DEADLINE_S
        return transport

    return ElasticServer(
        role,
        list(range(1, session.num_workers + 1)),
        SlotListener(session.store, epoch=epoch, timeout_s=session.timeout_s),
        make_transport,
        ledger_dir=directory,
        slot_wait_s=slot_wait_s,
        ledger=spec_of(algorithm).ledger,
        policy=policy,
        resumed=resumed,
        snapshots=snapshots,
    )


class SlotMember:
    """An own-loop worker's hold on its slot (its rank) under elastic membership."""

    def __init__(
        self,
        session: Session,
        run: dict[str, Any],
        *,
        numel: int,
        dtype: torch.dtype,
        compression: Compression | None,
    ) -> None:
        if run.get("membership") != "elastic":
            raise LaunchError(
                "this worker joined with membership='elastic' but the server runs a fixed roster; "
                "call api.join with the same membership on every rank"
            )
        assert session.store is not None
        self.store = session.store
        self.rank = session.env.rank
        self.workers = session.num_workers
        self.wait_s = float(run["slot_wait_s"])
        self.numel, self.dtype, self.compression = numel, dtype, compression
        self.directory = Path(str(run["checkpoints"]))
        try:
            self.member: Member = join(
                self.store,
                [self.rank],
                workers=self.workers,
                timeout_s=session.timeout_s,
                claim_wait_s=self.wait_s,
            )
        except RunOver as err:  # a replacement that came after the end: nothing to do
            log.info("%s; leaving", err)
            raise SystemExit(0) from None
        self.transport = self._transport(self.member)
        self.marker = StepMarker(self.directory / f"worker{self.rank}.step")
        self.ledger: Ledger | None = None
        self.role: WorkerRole | None = None

    def _transport(self, member: Member) -> PairTransport:
        return pair_transport(
            self.compression,
            worker=True,
            peer=SERVER_RANK,
            group=member.group,
            numel=self.numel,
            dtype=self.dtype,
            direct=True,
        )

    def hello(self) -> tuple[int, Tensor]:
        """Say HELLO with the step this slot's previous process reached (its marker); returns
        the slot's step (where this member goes on from) and the center."""
        header, center = hello(
            self.transport, step=self.marker.reached(), member=self.member.incarnation
        )
        self.marker.start(header.step, resumed=False)
        mark_started()
        log.info(
            "joined slot %d as member %d at step %d (pid %d)",
            self.member.slot,
            self.member.incarnation,
            header.step,
            os.getpid(),
        )
        return header.step, center

    def link(self, algorithm: str, *, overlap: bool) -> WorkerTransport:
        """The link the worker loop uses: one that rejoins a restarted server (blocking mode,
        rules with a ledger), else the plain one (a server's death ends this process, and its
        keeper starts the next)."""
        if overlap or spec_of(algorithm).ledger is None:
            return self.transport
        return RejoiningLink(self.transport, self._reconnect)

    def attach(self, loop: WorkerLoop, algorithm: str) -> None:
        """Count this member's ledger and mark its steps (a replacement knows where it got to)."""
        self.role = loop.role
        if spec_of(algorithm).ledger is not None:
            self.ledger = Ledger(loop.role, algorithm)
            self.ledger.attach(loop)
        loop.on_step.append(lambda role: self.marker.mark(role.step))

    def _reconnect(self, err: BaseException) -> PairTransport:
        assert self.role is not None and self.ledger is not None, "rejoins only with a ledger"
        self.member, transport = rejoin(
            self.store,
            self.member,
            err,
            workers=self.workers,
            wait_s=self.wait_s,
            make_transport=self._transport,
            step=self.role.step,
            ledger=self.ledger.total,
        )
        return transport

    def finish(self) -> None:
        """After DONE: leave this member's own ledger for the audit."""
        if self.ledger is not None:
            path = own_ledger_path(self.directory, self.member.slot, self.member.incarnation)
            torch.save(self.ledger.total, path)
        self.close()

    def close(self) -> None:
        """Release the step marker."""
        self.marker.close()
