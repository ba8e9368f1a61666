"""One process of a ``membership.mode=elastic`` run: the server, or a member in a worker slot.

It runs as the child of its rank's keeper (:mod:`easgd.topologies.keeper`) and joins no default
process group: the server announces its start (a new *epoch*) through the rendezvous store,
serves p slots (:class:`easgd.engine.members.ElasticServer`) and writes only its own state into
snapshots; a member waits for the server, claims its slot, opens its own 2-rank group with the
server (:mod:`easgd.comm.membership`), starts from the center at the slot's step and trains.
The store is torchrun's (the agent's), which outlives every child.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from typing import Any

import torch
from torch import Tensor

from easgd.comm.groups import (
    SERVER_RANK,
    DistEnv,
    LaunchError,
    PairGroups,
    open_joined_store,
    open_store,
)
from easgd.comm.membership import (
    MEMBER_END,
    Member,
    RunOver,
    SlotListener,
    SlotRefused,
    join,
    mark_run_over,
)
from easgd.comm.message import Header, ServerFailed
from easgd.comm.transport import PairTransport
from easgd.config.schema import TrainConfig
from easgd.engine.members import ElasticServer, own_ledger_path, start_server
from easgd.engine.worker import hello
from easgd.parts import interrupt
from easgd.parts.assembly import RunParts
from easgd.parts.build import transport_for
from easgd.recovery.checkpoint import Checkpointer
from easgd.recovery.resume import checkpoint_dir, checkpoint_signature, resume_server
from easgd.recovery.snapshot import Ledger, SnapshotCut, SnapshotLog, SnapshotWriter
from easgd.roles import WorkerRole, make_server_role
from easgd.topologies.server import (
    evaluate_center,
    record_server_run,
    resumed_from,
    serve_policy,
    supervise,
)
from easgd.topologies.worker import WorkerProcess

log = logging.getLogger("easgd")

SEED_STRIDE = 104_729
"""A member after the first in its slot draws minibatches from the slot's seed plus this times
its number, so a replacement does not replay its predecessor's stream."""


def run_member(
    cfg: TrainConfig, *, incarnation: int, started: Any = None, slot_box: Any = None
) -> dict[str, Any] | None:
    """This keeper child's part: the server on rank 0, a slot's member on the others (every
    process of a launch that joins from another node: ``membership.join``). ``started`` (an
    event, optional) is set once the server serves or the member has joined; ``slot_box`` (a
    shared int, optional) gets the member's slot."""
    from easgd.topologies.registry import role_name, setup_logging

    env = DistEnv.from_environ()
    joining = cfg.membership.join is not None
    setup_logging(f"node-rank{env.rank}" if joining else role_name(env.rank))
    if not joining and os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
        raise LaunchError(
            "membership.mode=elastic needs torchrun's shared rendezvous store (it outlives the "
            "processes that come and go); unset TORCH_DISABLE_SHARE_RDZV_TCP_STORE, or use "
            "membership.mode=fixed"
        )
    interrupt.install()
    parts = RunParts.load(cfg)
    store, generation = open_run_store(cfg, env)
    if env.rank == SERVER_RANK and not joining:
        try:
            return run_elastic_server(parts, store, generation, starts=incarnation, started=started)
        finally:
            mark_run_over(store)
    try:
        slots = open_slots(store, cfg) if joining else [env.rank]
        MemberProcess(
            parts, env, store, generation, starts=incarnation, started=started, slots=slots,
            slot_box=slot_box,
        ).run()  # fmt: skip
    except (RunOver, SlotRefused) as err:
        log.info("%s; leaving", err)
    return None


ROSTER_KEY = "run/roster"
"""Store key: the server's p and first open slot, for launches that join from other nodes."""


def open_run_store(cfg: TrainConfig, env: DistEnv) -> tuple[Any, int]:
    """The run's store and generation: this launch's own, or (``membership.join``) that of the
    run this launch joins from another node (generation 0: its faults fire in its first start)."""
    address, run_id = cfg.membership.join, cfg.membership.join_id
    if address is not None:
        return open_joined_store(address, run_id, timeout_s=cfg.comm.timeout_s), 0
    return open_store(env, timeout_s=cfg.comm.timeout_s)


def open_slots(store: Any, cfg: TrainConfig) -> list[int]:
    """The slots the server's launch left to other nodes (membership.open_slots), checked
    against this launch's ``workers``."""
    store.wait([ROSTER_KEY], timedelta(seconds=cfg.comm.timeout_s))
    roster = json.loads(store.get(ROSTER_KEY))
    if roster["workers"] != cfg.workers:
        raise LaunchError(
            f"membership.join={cfg.membership.join}: that run has workers={roster['workers']}, "
            f"this launch says workers={cfg.workers}; launch with workers={roster['workers']}"
        )
    if roster["first_open_slot"] > cfg.workers:
        raise LaunchError(
            f"membership.join={cfg.membership.join}: that run leaves no slot to other nodes; "
            "start its server's launch with membership.open_slots=<how many>"
        )
    return list(range(roster["first_open_slot"], cfg.workers + 1))


def run_elastic_server(
    parts: RunParts, store: Any, generation: int, *, starts: int, started: Any = None
) -> dict[str, Any]:
    """Rank 0's child: recover the center (newest committed snapshot), serve the slots."""
    cfg, split = parts.cfg, parts.split
    flat = parts.flat_model()
    role = make_server_role(cfg.algorithm, flat.initial_point(), num_workers=cfg.workers)
    signature = checkpoint_signature(cfg, flat.num_params)
    directory = checkpoint_dir(cfg)
    server_files = Checkpointer(directory, "server", keep=cfg.checkpoint.keep)
    restarts, resumed = resumed_from(role, resume_server(server_files, cfg, signature))
    first_open = cfg.workers - cfg.membership.open_slots + 1
    store.set(ROSTER_KEY, json.dumps({"workers": cfg.workers, "first_open_slot": first_open}))
    start = start_server(
        store,
        role,
        directory,
        list(range(1, cfg.workers + 1)),
        first_start=starts == 1,
        restarts=restarts,
        audited=cfg.algorithm.spec.ledger is not None,  # else (MDOWNPOUR) the snapshot's center
    )
    epoch, restarts = start.epoch, start.restarts
    if started is not None:
        started.set()
    record = parts.record(lead=True, progress=False)
    log.info(
        "%s with %d worker slots (elastic membership, server start %d, pid %d), tau=%d, "
        "%d parameters; run directory %s",
        cfg.algorithm.name,
        cfg.workers,
        epoch,
        os.getpid(),
        cfg.comm.period,
        flat.num_params,
        os.path.abspath(cfg.run_dir),
    )

    def make_transport(slot: int, group: Any) -> Any:
        transport = transport_for(cfg, MEMBER_END, group, flat.num_params, SERVER_RANK, direct=True)
        transport.recv_timeout_s = 7 * 24 * 3600.0  # liveness is the heartbeat's call
        return transport

    cut = SnapshotCut(next_number=SnapshotLog(directory).next_number())
    server = ElasticServer(
        role,
        list(range(1, cfg.workers + 1)),
        SlotListener(store, epoch=epoch, timeout_s=cfg.comm.timeout_s),
        make_transport,
        ledger_dir=directory,
        slot_wait_s=cfg.membership.slot_wait_s,
        ledger=cfg.algorithm.spec.ledger,
        policy=serve_policy(cfg),
        resumed=resumed,
        snapshots=cut,
    )
    supervisor = supervise(record, server, lambda p: evaluate_center(flat, split, p), store)
    supervisor.elapsed_before_s = start.elapsed_before_s  # max_wall_s is the job's
    snapshots = SnapshotWriter(
        cut,
        supervisor,
        directory,
        every_s=cfg.checkpoint.every_s,
        names=["server"],
        keep=cfg.checkpoint.keep,
        extra={"restarts": restarts, "signature": signature},
    )
    faults = parts.faults(SERVER_RANK, generation=generation + starts - 1)
    faults.watch_server(server)
    supervisor.on_tick.append(snapshots.tick)
    supervisor.on_tick.append(lambda: faults.server_tick(role.updates))
    try:
        outcome = supervisor.run()
        snapshots.finish()
        summary = record_server_run(
            record,
            outcome,
            server,
            snapshots.committed,
            restarts,
            flat.num_params,
            membership=server.membership_figures(),
        )
        return summary
    finally:
        record.runlog.close()


class MemberProcess(WorkerProcess):
    """A worker in a slot (its keeper's rank): joins, trains from the center at the slot's step."""

    keeps_snapshots = False

    def __init__(
        self,
        parts: RunParts,
        env: DistEnv,
        store: Any,
        generation: int,
        starts: int,
        started: Any = None,
        slots: list[int] | None = None,
        slot_box: Any = None,
    ) -> None:
        cfg = parts.cfg
        self.started = started
        member = join(
            store,
            slots or [env.rank],
            workers=cfg.workers,
            timeout_s=cfg.comm.timeout_s,
            claim_wait_s=cfg.membership.slot_wait_s,
        )
        self.member = member
        self.store = store
        if slot_box is not None:
            slot_box.value = member.slot
        if member.slot != env.rank:  # a process of a joining node: it is its slot's worker
            from easgd.topologies.registry import role_name, setup_logging

            setup_logging(role_name(member.slot))
            env = replace(env, rank=member.slot, world_size=cfg.world_size)
        pairs = PairGroups({env.rank: member.group}, store, generation + starts - 1, direct=True)
        super().__init__(parts, env, pairs)
        if starts > 1:  # a fresh stream: not the predecessor's minibatches again
            seed = cfg.seed * 1_000_003 + self.index + SEED_STRIDE * (starts - 1)
            self.sampler.generator.manual_seed(seed)
        if not cfg.comm.overlap and cfg.algorithm.spec.ledger is not None:
            # (else a server's death ends this process: overlap, or MDOWNPOUR's server momentum)
            assert isinstance(self.transport, PairTransport)
            self.transport = RejoiningLink(self.transport, self._reconnect)

    def _reconnect(self, err: BaseException) -> PairTransport:
        """The server is gone: rejoin the next one with this member's state (RejoiningLink)."""
        cfg, role, ledger = self.cfg, self.loop.role if self.loop else None, self.ledger
        assert role is not None and ledger is not None, "a member rejoins only with a ledger"
        self.member, transport = rejoin(
            self.store,
            self.member,
            err,
            workers=cfg.workers,
            wait_s=cfg.membership.slot_wait_s,
            make_transport=lambda member: transport_for(
                cfg,
                SERVER_RANK,
                member.group,
                self.flat.num_params,
                self.rank,
                worker=True,
                direct=True,
            ),
            step=role.step,
            ledger=ledger.total,
        )
        return transport

    def _join(self) -> WorkerRole:
        """HELLO with the step this slot's last process reached; start at the slot's step."""
        cfg = self.cfg
        reached = self.marker.reached()
        header, center = hello(self.transport, step=reached, member=self.member.incarnation)
        self.marker.start(header.step, resumed=False)
        role = self._make_role(center)
        role.step = header.step
        if cfg.algorithm.spec.ledger is not None:
            self.ledger = Ledger(role, cfg.algorithm.name)
        if self.started is not None:
            self.started.set()
        log.info(
            "joined slot %d as member %d at step %d (pid %d)",
            self.member.slot,
            self.member.incarnation,
            role.step,
            os.getpid(),
        )
        return role

    def run(self) -> None:
        """Train to the end, then leave this member's own ledger for the audit. Any failure ends
        this process (its keeper starts the next member); a server that failed ends it quietly."""
        self.heartbeat.start()
        try:
            self.loop = self._loop(self._join())
            self.loop.run()
            if self.ledger is not None:
                slot, number = self.member.slot, self.member.incarnation
                path = own_ledger_path(checkpoint_dir(self.cfg), slot, number)
                torch.save(self.ledger.total, path)
        except ServerFailed as err:
            log.error("%s; leaving", err)
        except RunOver as err:  # rejoining: the run ended, or this slot's DONE was applied
            log.info("%s; leaving", err)
        finally:
            self.heartbeat.stop()
            self.marker.close()


def rejoin(
    store: Any,
    old: Member,
    err: BaseException,
    *,
    workers: int,
    wait_s: float,
    make_transport: Callable[[Member], PairTransport],
    step: int,
    ledger: Tensor,
) -> tuple[Member, PairTransport]:
    """A live member whose server died (``err``): wait up to ``wait_s`` for the next server start
    (with a log line), claim the slot again, say HELLO with the member's ``step``, number and
    ``ledger`` (the new server adds it back into the center). Returns the member (keeping its
    number) and its new link; easgd.train's members and own-loop workers share it."""
    why = str(err).split(". This is typically")[0]
    log.warning("the server is gone (%s); waiting up to %g s for it to come back", why, wait_s)
    member = join(
        store,
        [old.slot],
        workers=workers,
        timeout_s=wait_s,
        claim_wait_s=wait_s,
        after_epoch=old.epoch,
    )
    transport = make_transport(member)
    hello(transport, step=step, member=old.incarnation, ledger=ledger)
    log.info("rejoined the server (start %d) at step %d", member.epoch, step)
    return replace(member, incarnation=old.incarnation), transport


class RejoiningLink:
    """A member's link to the server that outlives the server (``comm.overlap=false``).

    When a send or receive fails (the server died), ``reconnect`` waits for the next server start
    and rejoins it with the member's state (:func:`rejoin`: its own step, member number and
    ledger; the member keeps its own parameters) and returns the new link; the message in flight
    is sent again. An exchange the dead server applied but never answered was not counted in the
    ledger and not applied by the member, so it is neither lost nor applied twice (DOWNPOUR's
    push included).
    """

    def __init__(
        self, transport: PairTransport, reconnect: Callable[[BaseException], PairTransport]
    ) -> None:
        self.transport = transport
        self.reconnect = reconnect
        self.numel = transport.numel
        self._in_flight: tuple[Header, Tensor | None] | None = None

    def send(self, header: Header, payload: Tensor | None = None) -> None:
        """Send ``header`` (+ ``payload``); rejoin and send again if the server is gone."""
        self._in_flight = (header, payload)
        try:
            self.transport.send(header, payload)
        except Exception as err:
            self._rejoin(err)

    def recv(self) -> tuple[Header, Tensor | None]:
        """The reply to the message in flight; rejoin and ask again if the server is gone."""
        while True:
            try:
                return self.transport.recv()
            except Exception as err:
                self._rejoin(err)

    def send_control(self, header: Header, payload: Tensor | None = None) -> None:
        """The handshake's send (no rejoin: a member that cannot say HELLO starts anew)."""
        self.transport.send_control(header, payload)

    def recv_control(self) -> tuple[Header, Tensor | None]:
        """The handshake's receive."""
        return self.transport.recv_control()

    def send_tensor(self, tensor: Tensor) -> None:
        """A raw tensor (the ledger after a rejoining HELLO)."""
        self.transport.send_tensor(tensor)

    def _rejoin(self, err: BaseException) -> None:
        """Rejoin the next server, then resend what was in flight."""
        self.transport = self.reconnect(err)
        if self._in_flight is not None:
            self.transport.send(*self._in_flight)
