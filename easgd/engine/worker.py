"""A worker process's loop: local steps on its own data, an exchange with the server every tau steps.

The order of exchange and gradient is :func:`easgd.roles.worker_step`'s; this module adds what a
real process needs: the handshake, round trips over the transport, the straggler slowdown, the
overlap mode (exchanges in a background thread while stepping goes on) and the stop signal.
:meth:`WorkerLoop.run` composes public pieces (``start``, ``exchange_if_due``, ``end_step``,
``finish``) that :mod:`easgd.api` drives from a user's own training loop, so both share them.

Hooks (observers, called in order on the stepping thread; an empty list costs one check per
exchange or step, nothing more): :attr:`WorkerLoop.on_send` ``(payload)`` as an exchange's payload
leaves (the ledger subscribes), :attr:`WorkerLoop.on_step` ``(role)`` after each local step (a
process's step marker, heartbeat and fault injector). Replies are observed on the role itself
(:attr:`easgd.roles.WorkerRole.before_reply` / ``after_reply``), whoever drives it.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from easgd.comm.compression import FORMATS
from easgd.comm.message import (
    ERROR_FORMAT_MISMATCH,
    ERROR_NON_FINITE,
    ERROR_SERVER,
    ERROR_SHAPE_MISMATCH,
    Header,
    Op,
    ServerFailed,
    ServerRejected,
)
from easgd.comm.transport import PairTransport, WorkerTransport
from easgd.recovery.snapshot import WorkerSnapshots
from easgd.roles import GradientFn, WorkerRole, exchange_if_due, worker_step

SendHook = Callable[[Tensor | None], None]
"""Called with an exchange's payload as it leaves (valid until that exchange's reply is applied)."""
StepHook = Callable[[WorkerRole], None]
"""Called with the role after each local step."""

log = logging.getLogger("easgd.worker")

ROUND_TRIPS_KEPT = 100_000
"""How many of the newest round-trip times a worker keeps (for benchmarks), about 3 MB."""


def handshake(transport: WorkerTransport, *, step: int = 0, redone_steps: int = 0) -> Tensor:
    """Tell the server our parameter count (and resumed step) and receive the center."""
    return hello(transport, step=step, redone_steps=redone_steps)[1]


def hello(
    transport: WorkerTransport,
    *,
    step: int = 0,
    redone_steps: int = 0,
    member: int = 0,
    ledger: Tensor | None = None,
) -> tuple[Header, Tensor]:
    """:func:`handshake`, with the server's reply header (a slot's step under elastic membership).

    ``member``: this member's number in its slot; ``ledger``: rejoining a restarted server, the
    member's ledger, sent after the HELLO (workers that come and go)."""
    transport.send_control(
        Header(
            Op.HELLO,
            step=step,
            num_params=transport.numel,
            redone_steps=redone_steps,
            member=member,
            ledger=ledger is not None,
        )
    )
    if ledger is not None:
        assert isinstance(transport, PairTransport), "a rejoining member has one server"
        transport.send_tensor(ledger)
    header, center = transport.recv_control()
    if header.error == ERROR_FORMAT_MISMATCH:
        raise ServerRejected(
            f"the server expects comm.compression={FORMATS[header.compression]}; every rank "
            "must use the same comm.compression"
        )
    if header.error == ERROR_SHAPE_MISMATCH or center is None:
        raise ServerRejected(
            f"this worker's model has {transport.numel} parameters but the server's has "
            f"{header.num_params}; every rank must build the same model (same model.* config)"
        )
    return header, center.clone()


@dataclass
class WorkerOutcome:
    """A worker's end-of-run figures."""

    steps: int
    exchanges: int
    resets: int
    stopped_by_server: bool
    mean_exchange_ms: float
    max_overlap_staleness: int
    steps_per_s: float


class WorkerLoop:
    """Runs ``role`` for up to ``steps`` local steps, exchanging with the server over ``transport``."""

    def __init__(
        self,
        role: WorkerRole,
        transport: WorkerTransport,
        gradient: GradientFn,
        *,
        steps: int,
        slowdown: float = 1.0,
        overlap: bool = False,
        to_device: Callable[[Tensor], Tensor] = lambda t: t,
        after_step: Callable[[WorkerRole], None] | None = None,
        snapshots: WorkerSnapshots | None = None,
    ) -> None:
        self.role = role
        self.transport = transport
        self.gradient = gradient
        self.steps = steps
        self.slowdown = slowdown
        self.overlap = overlap
        self.to_device = to_device
        self.on_send: list[SendHook] = []
        """Observers of each exchange's payload as it leaves (see the module docstring)."""
        self.on_step: list[StepHook] = [] if after_step is None else [after_step]
        """Observers of each local step (``after_step`` is the first, when given)."""
        self.stop_requested = False
        self.exchanges = 0
        self.resets = 0
        self._loss_sum: float | Tensor = 0.0
        """Sum of the step losses since the last exchange; a device tensor when the gradient
        function returns one, read (one host sync) only when an exchange reports it."""
        self._loss_count = 0
        self._sent: Tensor | None = None
        """Overlap mode: the copy of the payload in flight (the role keeps stepping meanwhile)."""
        self._last_rtt_ms = 0.0
        self.round_trips_ms: deque[float] = deque(maxlen=ROUND_TRIPS_KEPT)
        """The newest exchanges' round-trip times, in order (bounded: a long run's memory stays
        flat); their mean over the whole run is kept apart."""
        self._round_trip_total_ms = 0.0
        self._inbox: queue.Queue[tuple[Header, Tensor | None, int]] = queue.Queue(maxsize=1)
        self._outbox: queue.Queue[tuple[Tensor | None, int, float] | None] = queue.Queue(maxsize=1)
        self._in_flight = False
        self._max_staleness = 0
        self._comm_thread: threading.Thread | None = None
        self._comm_error: BaseException | None = None
        self.snapshots = snapshots
        """Where this worker's part of a marked snapshot is saved (None: no snapshots)."""
        self._next_capture: dict | None = None  # the state before this step's exchange
        self._captured: dict | None = None  # the state when the in-flight exchange was sent
        self._started, self._first_step = time.perf_counter(), role.step

    # -- one round trip ---------------------------------------------------------------------
    def _mean_loss(self) -> float:
        """Mean train loss since the last exchange (reported to the server), then reset."""
        mean = float(self._loss_sum) / self._loss_count if self._loss_count else 0.0
        self._loss_sum, self._loss_count = 0.0, 0
        return mean

    def _round_trip(
        self, payload: Tensor | None, step: int, mean_loss: float
    ) -> tuple[Header, Tensor | None]:
        started = time.perf_counter()
        saved = self.snapshots.saved if self.snapshots is not None else 0
        self.transport.send(
            Header(
                Op.EXCHANGE,
                step=step,
                train_loss=mean_loss,
                latency_ms=self._last_rtt_ms,
                saved_snapshot=saved,
            ),
            payload,
        )
        header, reply = self.transport.recv()
        self._last_rtt_ms = 1000 * (time.perf_counter() - started)
        self.round_trips_ms.append(self._last_rtt_ms)
        self._round_trip_total_ms += self._last_rtt_ms
        self.exchanges += 1
        return header, reply

    def _apply(self, header: Header, reply: Tensor | None) -> None:
        if header.error == ERROR_SERVER:
            raise ServerFailed("the server failed and ended the run; its log has the traceback")
        snapshots, mark = self.snapshots, header.snapshot
        if mark and snapshots is not None and not snapshots.after_reply:
            assert self._captured is not None  # save it as it was when sent
            snapshots.save(mark, self._captured)
        self.stop_requested = self.stop_requested or header.stop
        assert reply is not None
        reply = self.to_device(reply)
        if header.error == ERROR_NON_FINITE:
            self.resets += 1
            log.warning("server rejected non-finite parameters; resetting to the center")
            self.role.reset(reply)
        else:
            self.role.incoming(reply)
        if mark and snapshots is not None and snapshots.after_reply:
            snapshots.save(mark, snapshots.capture())  # sharded cut: with this reply applied

    def _exchange(self, payload: Tensor | None) -> Tensor | None:
        if self.overlap:
            self._wait_in_flight()  # the reply it applies is part of the state sent now
            self._captured = self._capture_before_send()
            if payload is not None:  # the role updates it in place while the copy travels
                if self._sent is None:
                    self._sent = torch.empty_like(payload)
                payload = self._sent.copy_(payload)
            if self.on_send:
                for hook in self.on_send:
                    hook(payload)
            self._outbox.put((payload, self.role.step, self._mean_loss()))
            self._in_flight = True
            return None
        self._captured = self._next_capture
        if self.on_send:
            for hook in self.on_send:
                hook(payload)
        header, reply = self._round_trip(payload, self.role.step, self._mean_loss())
        self._apply(header, reply)
        return None  # already applied (or reset); nothing left for worker_step to apply

    # -- overlap mode --------------------------------------------------------------------------
    def _comm_loop(self) -> None:
        try:
            while (job := self._outbox.get()) is not None:
                payload, step, mean_loss = job
                header, reply = self._round_trip(payload, step, mean_loss)
                self._inbox.put((header, reply, step))
        except BaseException as err:  # surfaced in the stepping thread
            self._comm_error = err
            self._inbox.put((Header(Op.REPLY, stop=True), None, -1))

    def _take_reply(self, block: bool) -> None:
        try:
            header, reply, sent_at = self._inbox.get(block=block)
        except queue.Empty:
            return
        self._in_flight = False
        if self._comm_error is not None:
            raise RuntimeError("the exchange thread failed") from self._comm_error
        self._max_staleness = max(self._max_staleness, self.role.step - sent_at)
        self._apply(header, reply)

    def _wait_in_flight(self) -> None:
        if self._in_flight:
            self._take_reply(block=True)

    def stop_exchange_thread(self, timeout_s: float = 30.0) -> None:
        """End the exchange thread (after its in-flight round trip), so no send can race it."""
        thread = self._comm_thread
        if thread is None or not thread.is_alive():
            return
        if self._in_flight:
            with contextlib.suppress(queue.Empty):
                self._inbox.get(timeout=timeout_s)  # an unapplied reply: the run is ending
            self._in_flight = False
        with contextlib.suppress(queue.Full):
            self._outbox.put(None, timeout=timeout_s)
        thread.join(timeout=timeout_s)

    def send_failed(self) -> bool:
        """Tell the server this worker failed at its current step (False if it cannot be sent
        without racing a still-running exchange thread)."""
        if self._comm_thread is not None and self._comm_thread.is_alive():
            return False
        self.transport.send(Header(Op.FAILED, step=self.role.step))
        return True

    # -- the loop, in public pieces that easgd.api's optimizer wrapper drives too --------------
    def start(self) -> None:
        """Start the clock and, in overlap mode, the exchange thread: once, before the first step."""
        if self.overlap and self._comm_thread is None:
            self._comm_thread = threading.Thread(
                target=self._comm_loop, name="exchange", daemon=True
            )
            self._comm_thread.start()
        self._started, self._first_step = time.perf_counter(), self.role.step

    def take_arrived_reply(self) -> None:
        """Overlap mode: apply the reply of the exchange in flight if it has arrived (never waits)."""
        if self.overlap and self._in_flight:
            self._take_reply(block=False)

    def _capture_before_send(self) -> dict | None:
        """The state before an exchange is sent: what a marked reply saves (single server)."""
        if self.snapshots is None or self.snapshots.after_reply:
            return None
        return self.snapshots.capture()

    def _capture_if_due(self) -> None:
        if self.role.due() and not self.overlap:
            self._next_capture = self._capture_before_send()

    def exchange_if_due(self) -> None:
        """The exchange that starts step t_i when t_i % tau == 0 (what precedes the gradient)."""
        self.take_arrived_reply()
        self._capture_if_due()
        exchange_if_due(self.role, self._exchange)

    def end_step(self, loss: float | Tensor | None, step_started: float) -> None:
        """After-step bookkeeping: the loss reported at the next exchange, the slowdown, the hooks."""
        if loss is not None:
            self._loss_sum = loss + self._loss_sum  # stays on the device: no sync per step
            self._loss_count += 1
        if self.slowdown > 1.0:
            time.sleep((self.slowdown - 1.0) * (time.perf_counter() - step_started))
        if self.on_step:
            for hook in self.on_step:
                hook(self.role)

    def finish(self) -> WorkerOutcome:
        """Wait for the exchange in flight, say DONE (with the final payload), return the figures."""
        try:
            if self.overlap:
                self._wait_in_flight()
        finally:
            self.stop_exchange_thread()
        rate = (self.role.step - self._first_step) / max(time.perf_counter() - self._started, 1e-9)
        if self.snapshots is not None:  # before DONE: DONE is this worker's part of any snapshot
            self.snapshots.save_final()
        saved = self.snapshots.saved if self.snapshots is not None else 0
        self.transport.send(
            Header(Op.DONE, step=self.role.step, steps_per_s=rate, saved_snapshot=saved),
            self.role.final_outgoing(),
        )
        header, _ = self.transport.recv()
        if header.error == ERROR_SERVER:
            raise ServerFailed("the server failed and ended the run; its log has the traceback")
        return WorkerOutcome(
            steps=self.role.step,
            exchanges=self.exchanges,
            resets=self.resets,
            stopped_by_server=self.stop_requested,
            mean_exchange_ms=self._round_trip_total_ms / max(1, self.exchanges),
            max_overlap_staleness=self._max_staleness,
            steps_per_s=rate,
        )

    def run(self) -> WorkerOutcome:
        """Step until the budget is spent or the server says stop; then say DONE."""
        self.start()
        try:
            while self.role.step < self.steps and not self.stop_requested:
                self.take_arrived_reply()
                step_started = time.perf_counter()
                self._capture_if_due()
                loss = worker_step(self.role, self.gradient, self._exchange)
                self.end_step(loss, step_started)
        except BaseException:
            self.stop_exchange_thread()  # no send may race the exchange thread on the way out
            raise
        return self.finish()
