"""The parameter server's serving side: holds the center, serves each worker from its own thread.

Whoever comes first is served first: every worker has a thread blocked on its own pair's receive,
and a lock around the server role makes each update atomic (without it the conservation of
center + sum of workers breaks). Each update passes the divergence guard first (a non-finite or
oversized update never reaches the center; the worker is reset to it). Running the run (evaluation,
stop rules, liveness, snapshots, the run log) is :mod:`easgd.engine.supervisor`'s.

Failures are told apart: a worker whose connection breaks, or whose training loop stops
advancing (the supervisor's heartbeat check calls :meth:`ParameterServer.declare_lost`), is
*lost*; an exception in the server's own code (the role, a hook, the supervisor's evaluation or
run log) is a *server error*: every worker gets an error reply and leaves, and
:meth:`ParameterServer.raise_failure` re-raises the exception with its traceback. Under
``continue_on_failure`` a lost or failed worker leaves and the others go on; else the run stops.
Serve threads are joined at the end; only a thread blocked on a hung (stopped) worker cannot be,
since gloo cannot cancel a receive, and it is left behind as a daemon (the process still exits).

Hooks (observers, called in order; an empty list costs one check):

- :attr:`ParameterServer.before_update` ``(rank, payload)``: under the lock, just before the role
  applies a worker's payload (an exchange, or DONE's last payload); raising there is a server
  error (the fault injector's server raise subscribes here);
- :attr:`ParameterServer.on_exchange` ``(rank, header, reply, staleness)``: after an accepted
  exchange's reply is sent, on its serve thread (the supervisor's run log subscribes);
- :attr:`ParameterServer.on_unanswered` ``(rank, reply)``: an exchange was applied to the center
  but its reply could not be sent (the worker died meanwhile); called before the loss is raised
  (the elastic server's ledgers subscribe: the center has the change);
- :attr:`ParameterServer.on_worker_end` ``(rank)``: a serve thread ends (the supervisor's
  liveness watch and main loop subscribe).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import Tensor

from easgd.comm import transport as wire
from easgd.comm.compression import FORMATS, Compression, WireError
from easgd.comm.message import (
    ERROR_FORMAT_MISMATCH,
    ERROR_NON_FINITE,
    ERROR_SERVER,
    ERROR_SHAPE_MISMATCH,
    Header,
    Op,
)
from easgd.comm.transport import PairTransport
from easgd.engine import pipeline
from easgd.roles import ServerRole, UpdateRefused
from easgd.roles.links import ServerLink

if TYPE_CHECKING:
    from easgd.recovery.sharded_snapshot import BarrierCut
    from easgd.recovery.snapshot import SnapshotCut

log = logging.getLogger("easgd.server")

UpdateHook = Callable[[int, Tensor | None], None]
"""Called with (worker rank, payload) before the role applies the payload (under the lock)."""
ExchangeHook = Callable[[int, Header, Tensor, int], None]
"""Called with (worker rank, its header, the reply sent, staleness) after an accepted exchange."""
WorkerEndHook = Callable[[int], None]
"""Called with the worker rank when its serve thread ends."""
UnansweredHook = Callable[[int, Tensor], None]
"""Called with (worker rank, the reply it never got) for an applied exchange whose reply failed."""


@dataclass(frozen=True)
class ServePolicy:
    """How the server treats workers that fail or send bad updates."""

    continue_on_failure: bool = False
    """``worker_failure=continue``: a lost or failed worker leaves and the others go on (else the
    run stops and :meth:`ParameterServer.raise_failure` raises)."""
    max_update_norm: float | None = None
    """The divergence guard's limit on an update's norm (None: only non-finite ones are refused)."""


@dataclass(frozen=True)
class Resumed:
    """Where a resumed run starts: the server's part of the snapshot it resumed from."""

    exchanges: int = 0
    """Exchanges served before the snapshot."""
    finished: frozenset[int] = frozenset()
    """Workers that had said DONE (their final payload, if they resend it, is in the center)."""
    steps: dict[int, int] = field(default_factory=dict)
    """Each worker's step count in the snapshot (so the run's step counts go on from there)."""


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
    redone_steps: int = 0
    """Steps this worker computed before the last crash and computes again (from its HELLO)."""
    in_service: bool = False
    """A message of this worker is being served (its silence is not its own)."""


class PeerLost(ConnectionError):
    """The connection to a worker broke (it died, or its process group failed)."""


def _recv(transport: PairTransport, *, control: bool = False) -> tuple[Header, Tensor | None]:
    try:
        return transport.recv_control() if control else transport.recv()
    except Exception as err:
        raise PeerLost(f"{type(err).__name__}: {err}") from err


def _send(
    transport: PairTransport,
    header: Header,
    payload: Tensor | None = None,
    *,
    control: bool = False,
) -> None:
    try:
        if control:
            transport.send_control(header, payload)
        else:
            transport.send(header, payload)
    except Exception as err:
        raise PeerLost(f"{type(err).__name__}: {err}") from err


def _compression(transport: PairTransport) -> Compression | None:
    """The transport's compression (None: float32; test doubles may not say)."""
    return getattr(transport, "compression", None)


class ParameterServer:
    """Serves ``transports`` (worker rank -> pair transport) with ``role``, one thread per worker."""

    def __init__(
        self,
        role: ServerRole,
        transports: dict[int, PairTransport],
        policy: ServePolicy | None = None,
        *,
        resumed: Resumed | None = None,
        snapshots: SnapshotCut | BarrierCut | None = None,
    ) -> None:
        resumed = resumed or Resumed()
        self.role = role
        self.transports = transports
        self.policy = policy or ServePolicy()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.stop_reason = "steps"
        self.stats = {rank: WorkerStats(steps=resumed.steps.get(rank, 0)) for rank in transports}
        self.exchanges = self.resumed_exchanges = resumed.exchanges
        self.finished_before = set(resumed.finished)
        """Workers that had said DONE in the snapshot this run resumed from."""
        self.resumed_steps: dict[int, int] = {}
        """Each worker's step counter when it said HELLO (non-zero after a resume)."""
        self.snapshots = snapshots
        """The consistent-snapshot cut (None: no snapshots); told of every message under the lock."""
        self.lost: set[int] = set()
        """Workers declared lost by the liveness check (their threads may never end)."""
        self.server_error: BaseException | None = None
        """The first exception raised by the server's own code; it ends the run."""
        self._errors: list[BaseException] = []
        self._threads: dict[int, threading.Thread] = {}
        self.before_update: list[UpdateHook] = []
        self.on_exchange: list[ExchangeHook] = []
        self.on_unanswered: list[UnansweredHook] = []
        self.on_worker_end: list[WorkerEndHook] = []
        self.on_member_join: list[WorkerEndHook] = []
        """Called with a slot when a new member connected (workers that come and go:
        :mod:`easgd.engine.members`; a fixed worker is watched from the start)."""
        self.pipeline = True
        """Serve large elastic exchanges piece by piece (:mod:`easgd.engine.pipeline`); False:
        whole messages, as the benchmark's eager baseline."""
        self.links: dict[int, ServerLink] = {}
        """Each worker's compressed link (comm.compression; none: no entry), restarted from every
        float32 center the worker is sent (the handshake, a refused update)."""

    # -- threads -------------------------------------------------------------------------------
    def start(self) -> None:
        """Start one serve thread per worker (and the role's compiled update, in the background)."""
        self.role.compile_update(part_values=wire.PIECE_VALUES)
        self._threads = {
            rank: threading.Thread(
                target=self._serve, args=(rank,), name=f"serve-worker{rank}", daemon=True
            )
            for rank in self.transports
        }
        for thread in self._threads.values():
            thread.start()

    def serving(self) -> bool:
        """Whether a serve thread of a worker not declared lost is still running."""
        return any(t.is_alive() for r, t in self._threads.items() if r not in self.lost)

    def shut_down(self, *, grace_s: float = 5.0) -> None:
        """Join the serve threads; after a server error, workers waiting for a reply get one."""
        self.stop.set()
        deadline = time.perf_counter() + grace_s
        for rank, thread in self._threads.items():
            if rank in self.lost:
                continue  # blocked on a hung worker: gloo cannot cancel its receive
            if self.server_error is not None:
                thread.join(timeout=max(0.0, deadline - time.perf_counter()))
            else:
                thread.join()  # each remaining worker is told to stop at its next exchange
            if thread.is_alive():
                log.warning("serve thread of worker %d did not end; leaving it behind", rank)

    # -- per-worker service ----------------------------------------------------------------------
    def _serve(self, rank: int) -> None:
        try:
            self._serve_worker(rank)
        except PeerLost as err:  # a closed connection: the worker died or hung up
            self._worker_lost(rank, str(err), err)
        except Exception as err:  # a bug or failure in the server's own code
            self.fail(err)
            self._tell_server_failed(rank)
        finally:
            self.stats[rank].in_service = False
            for hook in self.on_worker_end:
                hook(rank)

    def _serve_worker(self, rank: int) -> None:
        transport, stats = self.transports[rank], self.stats[rank]
        header, _ = _recv(transport, control=True)
        if header.op != Op.HELLO:
            raise PeerLost(f"worker {rank} spoke before its handshake (op {header.op.name})")
        self._hello(rank, transport, header)
        while True:
            if pipeline.pipelines(self, transport):
                received, payload = self._recv_pipelined(rank, transport)
                if received is None:
                    continue  # an exchange served piece by piece
                header = received
            else:
                header, payload = _recv(transport)
            stats.in_service = True
            if self.server_error is not None:
                self._tell_server_failed(rank)
                return
            if header.op == Op.HELLO:
                raise PeerLost(f"worker {rank} said HELLO twice")
            elif header.op == Op.EXCHANGE:
                self._exchange(rank, transport, header, self._decode(rank, payload))
            elif header.op == Op.DONE:
                self._done(rank, transport, header, self._decode(rank, payload))
                return
            elif header.op == Op.FAILED:
                self._failed(rank, header)
                return
            stats.in_service = False

    def _recv_pipelined(
        self, rank: int, transport: PairTransport
    ) -> tuple[Header | None, Tensor | None]:
        """Receive a header; an exchange's payload is served as it arrives (returns None, None),
        any other message is returned whole."""
        try:
            header = transport.recv_header()
            incoming = None
            if header.op == Op.EXCHANGE and self.server_error is None:
                incoming = transport.incoming(header)
            if incoming is None:
                return header, transport.recv_payload(header)
        except Exception as err:
            raise PeerLost(f"{type(err).__name__}: {err}") from err
        stats = self.stats[rank]
        stats.in_service = True
        try:
            pipeline.exchange(self, rank, transport, header, incoming)
        finally:
            stats.in_service = False
        return None, None

    def _update(self, rank: int, payload: Tensor | None, *, exchange: bool) -> Tensor:
        """The role applies ``payload`` (under the lock), after the ``before_update`` hooks.

        An exchange's reply goes into the payload's own buffer, under the norm limit; DONE's last
        payload (checked before) is applied with neither.
        """
        if self.before_update:
            for hook in self.before_update:
                hook(rank, payload)
        if not exchange:
            return self.role.handle(rank, payload)
        limit = self.policy.max_update_norm
        link = self.links.get(rank)
        if link is not None:  # the compressed reply; the hooks read link.decoded_reply
            return link.apply(self.role, rank, payload, max_update_norm=limit)
        return self.role.handle(rank, payload, out=payload, max_update_norm=limit)

    def _decode(self, rank: int, payload: Tensor | None) -> Tensor | None:
        """A compressed payload as the role reads it (a wrong format or size loses the worker)."""
        link = self.links.get(rank)
        if link is None or payload is None:
            return payload
        try:
            return link.decode(payload)
        except WireError as err:
            raise PeerLost(f"worker {rank}: {err}") from err

    def _restart_link(self, rank: int, transport: PairTransport, center: Tensor) -> None:
        """Both ends of a compressed link restart from a float32 center sent to the worker."""
        compression = _compression(transport)
        if compression is not None:
            self.links[rank] = ServerLink(compression, center)

    def _hello(self, rank: int, transport: PairTransport, header: Header) -> None:
        expected = _compression(transport)
        code = 0 if expected is None else FORMATS.index(expected.name)
        if header.compression != code:
            _send(transport, Header(Op.REPLY, error=ERROR_FORMAT_MISMATCH), control=True)
            raise PeerLost(
                f"worker {rank} sends comm.compression={FORMATS[header.compression]}, the server "
                f"expects {FORMATS[code]}; every rank must use the same comm.compression"
            )
        if header.num_params != transport.numel:
            log.error(
                "worker %d has %d parameters, the server's model has %d",
                rank,
                header.num_params,
                transport.numel,
            )
            _send(
                transport,
                Header(Op.REPLY, error=ERROR_SHAPE_MISMATCH, num_params=transport.numel),
                control=True,
            )
            raise PeerLost(
                f"worker {rank} model has {header.num_params} parameters, server has {transport.numel}; "
                "every rank must build the same model (same model.* config)"
            )
        with self.lock:
            center = self.role.center.clone()
            self.stats[rank].last_read = self.role.updates
        self.stats[rank].steps = self.resumed_steps[rank] = header.step
        self.stats[rank].redone_steps = header.redone_steps
        self._restart_link(rank, transport, center)
        _send(transport, Header(Op.REPLY, step=self._reply_step(rank)), center, control=True)

    def _reply_step(self, rank: int) -> int:
        """The ``step`` of the HELLO reply: the server's update count."""
        return self.role.updates

    def _exchange(
        self, rank: int, transport: PairTransport, header: Header, payload: Tensor | None
    ) -> None:
        stats = self.stats[rank]
        # checks on this thread's own payload, outside the lock that serialises the workers
        refusal = self._refuse(payload)
        with self.lock:
            mark = self.snapshots.on_message(rank, header) if self.snapshots is not None else 0
            staleness = self.role.updates - stats.last_read
            if refusal is None:
                try:
                    # the reply goes into this worker's own receive buffer (the payload is read
                    # first), so it stays consistent once the lock is released
                    reply = self._update(rank, payload, exchange=True)
                except UpdateRefused as err:
                    refusal = str(err)
            if refusal is None:
                stats.last_read = self.role.updates
                self.exchanges += 1
            else:
                reply = self.role.reply_center(out=payload)
                stats.last_read = self.role.updates
                self._restart_link(rank, transport, reply)
            exchanges = self.exchanges
        if refusal is not None:
            self._refused(rank, transport, header, refusal, reply, mark)
            return
        stop = self.stop.is_set()
        reply_header = Header(
            Op.REPLY, step=exchanges, staleness=staleness, stop=stop, snapshot=mark
        )
        link = self.links.get(rank)
        try:
            _send(transport, reply_header, reply)
        except PeerLost:
            self.unanswered(rank, reply if link is None else link.decoded_reply)
            raise
        stats.steps, stats.exchanges = header.step, stats.exchanges + 1
        if link is not None:
            reply = link.decoded_reply  # what the worker applies
        for hook in self.on_exchange:
            hook(rank, header, reply, staleness)

    def unanswered(self, rank: int, reply: Tensor) -> None:
        """An applied exchange whose reply never reached the worker: tell the subscribers."""
        for hook in self.on_unanswered:
            hook(rank, reply)

    def _refused(
        self,
        rank: int,
        transport: PairTransport,
        header: Header,
        refusal: str,
        center: Tensor,
        mark: int,
    ) -> None:
        """Divergence guard: the center never saw the update; the worker restarts from it."""
        self.stats[rank].rejected += 1
        log.warning(
            "refused worker %d's update at step %d (%s); reset to the center",
            rank,
            header.step,
            refusal,
        )
        _send(
            transport,
            Header(Op.REPLY, error=ERROR_NON_FINITE, stop=self.stop.is_set(), snapshot=mark),
            center,
        )

    def _done(
        self, rank: int, transport: PairTransport, header: Header, payload: Tensor | None
    ) -> None:
        stats = self.stats[rank]
        with self.lock:
            resent = rank in self.finished_before  # already in the center
            if payload is not None and not resent and self._refuse(payload) is None:
                self._update(rank, payload, exchange=False)  # MDOWNPOUR's last gradient
            # finished together with its last payload: a snapshot sees both or neither
            stats.finished = True
            if self.snapshots is not None:
                self.snapshots.on_message(rank, header)
        stats.steps = header.step
        stats.steps_per_s = header.steps_per_s
        _send(transport, Header(Op.REPLY))

    def _failed(self, rank: int, header: Header) -> None:
        stats = self.stats[rank]
        stats.failed = f"worker raised an exception at step {header.step}"
        stats.steps = max(stats.steps, header.step)
        log.warning("worker %d left after an exception at step %d", rank, header.step)
        if self.policy.continue_on_failure:
            self._drop(rank)
        else:
            self._errors.append(RuntimeError(f"worker {rank}: {stats.failed}"))
            self.stop_run("worker_failure")

    def _refuse(self, payload: Tensor | None) -> str | None:
        """Why an update must not reach the center, or None: one read pass over ``payload``.

        Needs no lock (the payload is the serving thread's own). Where the update's norm depends
        on the center (elastic), the role measures it during the update instead.
        """
        if payload is None:
            return None
        limit = self.policy.max_update_norm
        norm = self.role.update_norm(payload) if limit is not None else None
        # a NaN or infinity anywhere makes the norm (or the sum) non-finite
        if not math.isfinite(float(payload.sum()) if norm is None else norm):
            return "non-finite values"
        if norm is not None and limit is not None and norm > limit:
            return f"update norm {norm:.3g} > max_update_norm {limit:g}"
        return None

    # -- failures --------------------------------------------------------------------------------
    def _drop(self, rank: int) -> None:
        with self.lock:
            if self.snapshots is not None:
                self.snapshots.drop(rank)

    def declare_lost(self, rank: int, reason: str) -> None:
        """The liveness check found ``rank`` silent too long: it is lost (its thread may hang)."""
        self.lost.add(rank)
        self._worker_lost(rank, reason, RuntimeError(f"worker {rank}: {reason}"))

    def _worker_lost(self, rank: int, why: str, err: BaseException) -> None:
        stats = self.stats[rank]
        if stats.failed or stats.finished:
            return
        stats.failed = why
        if self.policy.continue_on_failure:  # under fail_fast no snapshot may complete without it
            self._drop(rank)
        if self.stop.is_set() and self.stop_reason == "worker_failure" and self._errors:
            log.info("worker %d left after the run stopped (%s)", rank, why)
        elif self.policy.continue_on_failure:
            log.warning("worker %d lost (%s); continuing with the others", rank, why)
        else:
            log.error("worker %d lost (%s); stopping (worker_failure=fail_fast)", rank, why)
            self._errors.append(err)
            self.stop_run("worker_failure")

    def stop_run(self, reason: str) -> None:
        """Tell every worker to stop at its next exchange, for ``reason``."""
        self.stop_reason = reason
        self.stop.set()

    def fail(self, err: BaseException) -> None:
        """The server's own code raised: stop the run; every worker gets an error reply."""
        if self.server_error is None:
            self.server_error = err
            log.error("server error, ending the run", exc_info=err)
        self.stop_run("server_error")

    def _tell_server_failed(self, rank: int) -> None:
        try:
            self.transports[rank].send(Header(Op.REPLY, error=ERROR_SERVER, stop=True))
        except Exception as err:  # the worker may be gone as well
            log.debug("could not tell worker %d that the server failed: %s", rank, err)

    def failed(self) -> bool:
        """Whether the run is ending on a failure (a worker under fail_fast, or the server)."""
        return bool(self._errors) or self.server_error is not None

    def raise_failure(self) -> None:
        """Re-raise a server error, or raise for a worker that failed under fail_fast."""
        if self.server_error is not None:
            raise self.server_error
        if self._errors and not self.policy.continue_on_failure:
            raise RuntimeError(f"a worker failed: {self._errors[0]}") from self._errors[0]

    def running_workers(self) -> list[int]:
        """Workers neither finished nor failed nor lost (call under :attr:`lock`)."""
        return [r for r, s in self.stats.items() if not (s.finished or s.failed or r in self.lost)]
