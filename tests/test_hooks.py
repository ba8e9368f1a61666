"""The observers that replace run-time patches: each hook fires at its one right point.

- the server's ``before_update`` (the fault injector's server raise subscribes): the raise comes
  at the update after exactly ``raise_at_step`` updates, on the serve thread, as a server error;
- the role's ``before_reply`` / ``after_reply`` and the worker loop's ``on_send`` (the ledger
  and the exchange probe subscribe): the ledger counts each applied change once, read before the
  role reuses its buffers, and never a refused one;
- a marked reply saves the worker's part with the reply applied (sharded cut) or as it was sent
  (single server's cut);
- the snapshot cut says whether the server may begin a snapshot, not the server's isinstance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from easgd.comm.message import ERROR_NON_FINITE, ERROR_SERVER, Header, Op
from easgd.config.schema import FaultConfig
from easgd.engine.server import ParameterServer, ServePolicy
from easgd.engine.supervisor import Supervision, Supervisor
from easgd.engine.worker import WorkerLoop
from easgd.parts.faults import FaultInjector
from easgd.parts.runlog import RunLog
from easgd.recovery.sharded_snapshot import BarrierCut
from easgd.recovery.snapshot import Ledger, SnapshotCut, WorkerSnapshots
from easgd.roles import DownpourServer, DownpourWorker, ElasticServer, ElasticWorker, WorkerRole

D = torch.float64
NUMEL = 4


# -- the server's before_update: the fault injector's server raise ----------------------------


class ScriptedTransport:
    """A worker's pair as the server sees it: a HELLO, then ``messages``, then a closed link."""

    def __init__(self, messages: list[tuple[Header, Tensor | None]]) -> None:
        self.numel = NUMEL
        self.recv_timeout_s = 60.0
        self._messages = list(messages)
        self.sent: list[Header] = []

    def recv_control(self) -> tuple[Header, Tensor | None]:
        return Header(Op.HELLO, num_params=NUMEL), None

    def recv(self) -> tuple[Header, Tensor | None]:
        if not self._messages:
            raise ConnectionError("closed")
        header, payload = self._messages.pop(0)
        return header, None if payload is None else payload.clone()

    def send(self, header: Header, payload: Tensor | None = None) -> None:
        self.sent.append(header)

    send_control = send


def _exchanges(count: int) -> list[tuple[Header, Tensor | None]]:
    return [
        (Header(Op.EXCHANGE, step=s + 1), torch.full((NUMEL,), 1.0, dtype=D)) for s in range(count)
    ]


@pytest.mark.parametrize("raise_at", [0, 3])
def test_the_server_fault_raises_after_exactly_raise_at_step_updates(raise_at: int) -> None:
    role = DownpourServer(torch.zeros(NUMEL, dtype=D))
    transport = ScriptedTransport(_exchanges(raise_at + 2))
    server = ParameterServer(role, {1: transport})  # type: ignore[dict-item]
    fault = FaultConfig(raise_rank=0, raise_at_step=raise_at)
    FaultInjector(fault, 0, generation=0).watch_server(server)
    server.start()
    server.shut_down()
    assert role.updates == raise_at  # the update after them raised instead of being applied
    assert torch.equal(role.center, torch.full((NUMEL,), float(raise_at), dtype=D))
    assert str(server.server_error) == f"fault injection: the server raises at update {raise_at}"
    # HELLO's reply, one reply per applied update, then the error reply (a server error)
    assert [h.error for h in transport.sent] == [0] * (raise_at + 1) + [ERROR_SERVER]
    with pytest.raises(RuntimeError, match="the server raises at update"):
        server.raise_failure()


def test_the_server_fault_does_not_fire_in_a_restarted_job() -> None:
    role = DownpourServer(torch.zeros(NUMEL, dtype=D))
    server = ParameterServer(role, {1: ScriptedTransport(_exchanges(3))})  # type: ignore[dict-item]
    FaultInjector(FaultConfig(raise_rank=0, raise_at_step=1), 0, generation=1).watch_server(server)
    assert server.before_update == []  # nothing subscribed: nothing to pay per update
    server.start()
    server.shut_down()
    assert role.updates == 3 and server.server_error is None


def test_before_update_sees_every_applied_payload_and_on_exchange_only_accepted_ones() -> None:
    role = DownpourServer(torch.zeros(NUMEL, dtype=D))
    messages = _exchanges(3)
    messages[1] = (messages[1][0], torch.full((NUMEL,), float("nan"), dtype=D))  # refused
    server = ParameterServer(role, {1: ScriptedTransport(messages)})  # type: ignore[dict-item]
    seen: list[tuple[str, int, int]] = []
    server.before_update.append(lambda rank, payload: seen.append(("before", rank, role.updates)))
    server.on_exchange.append(
        lambda rank, header, reply, staleness: seen.append(("exchange", header.step, role.updates))
    )
    server.start()
    server.shut_down()
    assert seen == [("before", 1, 0), ("exchange", 1, 1), ("before", 1, 1), ("exchange", 3, 2)]
    assert server.stats[1].rejected == 1


# -- the role's reply hooks and the worker loop's on_send -------------------------------------


def test_reply_hooks_run_around_the_rule_in_order() -> None:
    role = DownpourWorker(torch.ones(NUMEL, dtype=D), comm_period=1, learning_rate=0.5)
    role.local_step(torch.ones(NUMEL, dtype=D))  # x = 0.5, a = -0.5
    seen: list[tuple[str, float, float]] = []
    for name in ("first", "second"):
        role.before_reply.append(
            lambda r, reply, name=name: seen.append((name, float(r.params[0]), float(r.accumulated[0])))
        )  # fmt: skip
    role.after_reply.append(
        lambda r, reply: seen.append(("after", float(r.params[0]), float(r.accumulated[0])))
    )
    role.incoming(torch.full((NUMEL,), 2.0, dtype=D))
    assert seen == [("first", 0.5, -0.5), ("second", 0.5, -0.5), ("after", 2.0, 0.0)]


def test_a_role_that_overrides_incoming_is_refused() -> None:
    with pytest.raises(TypeError, match="implement apply_reply"):

        class Sneaky(ElasticWorker):  # noqa: F841 - defining it is the test
            def incoming(self, reply: Tensor) -> None:  # type: ignore[override]
                pass


class LoopbackTransport:
    """A worker's link to a server role in this process; refuses and marks chosen exchanges."""

    def __init__(
        self,
        server: Any,
        *,
        refuse: frozenset[int] = frozenset(),
        marks: dict[int, int] | None = None,
    ) -> None:
        self.numel = NUMEL
        self.server = server
        self.refuse, self.marks = refuse, marks or {}
        self.exchanges = 0
        self._reply: tuple[Header, Tensor | None] = (Header(Op.REPLY), None)

    def send(self, header: Header, payload: Tensor | None = None) -> None:
        if header.op != Op.EXCHANGE:
            self._reply = (Header(Op.REPLY), None)
            return
        self.exchanges += 1
        mark = self.marks.get(self.exchanges, 0)
        if self.exchanges in self.refuse:  # the divergence guard: the center does not move
            reply = self.server.reply_center()
            self._reply = (Header(Op.REPLY, error=ERROR_NON_FINITE, snapshot=mark), reply)
            return
        sent = None if payload is None else payload.clone()  # as a real send copies
        self._reply = (Header(Op.REPLY, snapshot=mark), self.server.handle(0, sent))

    def recv(self) -> tuple[Header, Tensor | None]:
        return self._reply


def _gradient(point: Tensor) -> tuple[float, Tensor]:
    return 0.0, point - torch.arange(NUMEL, dtype=D)  # F = |x - target|^2 / 2


@pytest.mark.parametrize("algorithm", ["easgd", "downpour"])
def test_the_ledger_counts_every_applied_change_once_and_no_refused_one(algorithm: str) -> None:
    start = torch.full((NUMEL,), 5.0, dtype=D)
    if algorithm == "easgd":
        server: Any = ElasticServer(start, moving_rate=0.3)
        role: WorkerRole = ElasticWorker(start + 1, comm_period=2, learning_rate=0.1, momentum=0.0)
    else:
        server = DownpourServer(start)
        role = DownpourWorker(start, comm_period=2, learning_rate=0.1)
    transport = LoopbackTransport(server, refuse=frozenset({3}))
    loop = WorkerLoop(role, transport, _gradient, steps=12)  # type: ignore[arg-type]
    ledger = Ledger(role, algorithm)
    ledger.attach(loop)
    loop.run()
    assert transport.exchanges == 6 and loop.resets == 1
    # the center moved by what the ledger counted (the same additions, in another order)
    torch.testing.assert_close(server.center, start + ledger.total, rtol=0, atol=1e-12)
    assert not torch.equal(ledger.total, torch.zeros(NUMEL, dtype=D))


def test_on_send_sees_each_payload_as_it_leaves_and_on_step_each_step() -> None:
    role = DownpourWorker(torch.zeros(NUMEL, dtype=D), comm_period=3, learning_rate=1.0)
    loop = WorkerLoop(role, LoopbackTransport(DownpourServer(torch.zeros(NUMEL, dtype=D))), _gradient, steps=7)  # type: ignore[arg-type]  # fmt: skip
    sent: list[tuple[int, Tensor]] = []
    steps: list[int] = []
    loop.on_send.append(lambda payload: sent.append((role.step, payload.clone())))  # type: ignore[union-attr]
    loop.on_step.append(lambda r: steps.append(r.step))
    loop.run()
    assert [step for step, _ in sent] == [0, 3, 6]  # at t_i % tau == 0, before the step
    assert torch.equal(sent[0][1], torch.zeros(NUMEL, dtype=D))  # nothing accumulated yet
    assert steps == list(range(1, 8))


# -- where a marked reply's snapshot part is captured -----------------------------------------


class Saved:
    """Stands in for a worker's checkpointer: keeps what it is asked to save."""

    def __init__(self) -> None:
        self.parts: dict[int, dict[str, Any]] = {}

    def save(self, state: dict[str, Any], number: int) -> None:
        self.parts[number] = state

    def save_final(self, state: dict[str, Any]) -> None:
        self.parts[-1] = state


@pytest.mark.parametrize("after_reply", [False, True])
def test_a_marked_reply_saves_the_state_as_sent_or_with_the_reply_applied(
    after_reply: bool,
) -> None:
    start = torch.full((NUMEL,), 5.0, dtype=D)
    role = ElasticWorker(start + 1, comm_period=1, learning_rate=0.1, momentum=0.0)
    transport = LoopbackTransport(ElasticServer(start, moving_rate=0.3), marks={3: 7})
    saved = Saved()
    snapshots = WorkerSnapshots(
        saved,  # type: ignore[arg-type]
        lambda: {"params": role.params.clone(), "step": role.step},
        after_reply=after_reply,
    )
    at_third: dict[str, Tensor] = {}

    def note(when: str, r: WorkerRole, reply: Tensor) -> None:
        if transport.exchanges == 3:
            at_third[when] = r.params.clone()

    role.before_reply.append(lambda r, reply: note("before", r, reply))
    role.after_reply.append(lambda r, reply: note("after", r, reply))
    WorkerLoop(role, transport, _gradient, steps=5, snapshots=snapshots).run()  # type: ignore[arg-type]
    part = saved.parts[7]
    assert part["step"] == 2  # the third exchange starts step t = 2
    expected = at_third["after" if after_reply else "before"]
    assert torch.equal(part["params"], expected)
    assert not torch.equal(at_third["before"], at_third["after"])  # the two are told apart


# -- the supervisor hosts the cut (one protocol for both cuts) ---------------------------------


def _supervisor(tmp_path: Path, cut: SnapshotCut | BarrierCut) -> Supervisor:
    role = ElasticServer(torch.zeros(NUMEL, dtype=D), moving_rate=0.5)
    server = ParameterServer(role, {1: ScriptedTransport([])}, ServePolicy(), snapshots=cut)  # type: ignore[dict-item]
    runlog = RunLog(tmp_path, tensorboard=False)
    evaluate = lambda point: {"test_loss": 0.0, "test_error": 0.0}  # noqa: E731
    return Supervisor(server, evaluate, runlog, Supervision(eval_interval_s=3600))


def test_the_marker_cut_copies_the_supervised_servers_state_at_the_start(tmp_path: Path) -> None:
    cut = SnapshotCut(next_number=4)
    supervisor = _supervisor(tmp_path, cut)
    with supervisor.lock:
        assert cut.begin(supervisor.running_workers()) == 4
        with pytest.raises(RuntimeError, match="still in progress"):  # one at a time
            cut.begin(supervisor.running_workers())
    (number, state), *rest = cut.take_parts()
    assert number == 4 and rest == [] and state["exchanges"] == 0 and state["finished"] == []
    supervisor.runlog.close()


def test_a_barrier_cut_is_bound_to_its_supervisor(tmp_path: Path) -> None:
    cut = BarrierCut(lead=True)
    supervisor = _supervisor(tmp_path, cut)
    supervisor.server.stats[1].finished = True
    with supervisor.lock:  # no worker running: every one has crossed, the part is copied at once
        assert cut.begin(supervisor.running_workers()) == 1
    assert cut.take_parts()[0][1]["exchanges"] == 0
    supervisor.runlog.close()
