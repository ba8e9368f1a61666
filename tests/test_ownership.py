"""Who owns which tensor: copies at the boundaries, strict restores, and no torn reads on the server.

Roles update their variables in place, so every tensor that leaves a role for longer than one
call (a reply, a checkpoint, an evaluation snapshot, a simulator history) must be a copy taken at
a consistent moment. These tests pin that down, including under threads hammering the server.
"""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path

import pytest
import torch
from torch import Tensor

from easgd.algorithms import inplace
from easgd.comm.message import Header, Op
from easgd.config.algorithm import AlgorithmConfig
from easgd.engine.server import ParameterServer
from easgd.engine.supervisor import Supervision, Supervisor
from easgd.parts.runlog import RunLog
from easgd.roles import (
    DownpourServer,
    ElasticServer,
    ElasticWorker,
    SequentialWorker,
    make_server_role,
    make_worker_role,
)

NUMEL = 3 * inplace.CHUNK + 5  # several chunks: a read in the middle of an update would show
SNAPSHOTS = 16  # per watcher: each is a copy of the center (3 MB)


# -- strict, copying state dictionaries -------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["easgd", "eamsgd", "downpour", "adownpour", "mdownpour", "msgd", "asgd"]
)
def test_state_dict_round_trips_and_is_a_copy(name: str) -> None:
    momentum = 0.9 if name in ("eamsgd", "msgd", "mdownpour") else 0.0
    config = AlgorithmConfig(name, learning_rate=0.1, momentum=momentum, moving_rate=0.2)
    start = torch.arange(6, dtype=torch.float64)
    worker = make_worker_role(config, start, comm_period=1)
    worker.local_step(torch.ones(6, dtype=torch.float64))
    state = worker.state_dict()
    saved = {k: v.clone() if isinstance(v, Tensor) else v for k, v in state.items()}
    worker.local_step(torch.ones(6, dtype=torch.float64))  # in place: must not reach `state`
    assert all(torch.equal(state[k], v) for k, v in saved.items() if isinstance(v, Tensor))
    fresh = make_worker_role(config, torch.zeros(6, dtype=torch.float64), comm_period=1)
    fresh.load_state_dict(state)
    assert fresh.step == 1 and torch.equal(fresh.params, saved["params"])
    state["params"].fill_(7.0)  # the restore copied: the role does not alias the dictionary
    assert not torch.equal(fresh.params, state["params"])
    if config.uses_server:
        server = make_server_role(config, start, num_workers=2)
        server.handle(0, torch.ones(6, dtype=torch.float64))
        server_state = server.state_dict()
        before = server_state["center"].clone()  # type: ignore[union-attr]
        server.handle(0, torch.ones(6, dtype=torch.float64))
        assert torch.equal(server_state["center"], before)  # type: ignore[arg-type]
        other = make_server_role(config, torch.zeros(6, dtype=torch.float64), num_workers=2)
        other.load_state_dict(server_state)
        assert other.updates == 1 and torch.equal(other.center, before)


def test_load_state_dict_rejects_unknown_missing_and_misshapen_entries() -> None:
    role = ElasticWorker(torch.zeros(4), comm_period=1, learning_rate=0.1, momentum=0.9)
    good = role.state_dict()
    with pytest.raises(ValueError, match=r"unknown keys \['accumulated'\]"):
        role.load_state_dict({**good, "accumulated": torch.zeros(4)})
    with pytest.raises(ValueError, match=r"missing keys \['velocity'\]"):
        role.load_state_dict({k: v for k, v in good.items() if k != "velocity"})
    with pytest.raises(ValueError, match=r"'params' has shape \(5,\), the role has \(4,\)"):
        role.load_state_dict({**good, "params": torch.zeros(5)})
    with pytest.raises(ValueError, match="'step' must be an integer"):
        role.load_state_dict({**good, "step": 1.5})
    averaging = SequentialWorker(
        torch.zeros(4), learning_rate=0.1, momentum=0.0, average=True, average_rate=None
    )
    with pytest.raises(ValueError, match=r"missing keys \['average'\]"):
        averaging.load_state_dict(
            SequentialWorker(
                torch.zeros(4), learning_rate=0.1, momentum=0.0, average=False, average_rate=None
            ).state_dict()
        )
    server = DownpourServer(torch.zeros(4), average=True)
    with pytest.raises(ValueError, match=r"missing keys \['average'\]"):
        server.load_state_dict(DownpourServer(torch.zeros(4)).state_dict())
    assert torch.equal(role.params, torch.zeros(4))  # nothing written by a refused restore


def test_replies_never_alias_the_center() -> None:
    server = DownpourServer(torch.zeros(3))
    first = server.handle(0, torch.ones(3))
    server.handle(1, torch.ones(3))
    assert torch.equal(first, torch.ones(3)) and torch.equal(server.center, torch.full((3,), 2.0))
    elastic = ElasticServer(torch.zeros(3), moving_rate=0.5)
    reply = elastic.handle(0, torch.full((3,), 2.0))
    elastic.handle(1, torch.full((3,), 4.0))
    assert torch.equal(reply, torch.ones(3))


# -- concurrent exchanges and snapshots on the real server -------------------------------------


class RecordingTransport:
    """Stands in for a pair transport: keeps a copy of every reply, as a real send would."""

    def __init__(self) -> None:
        self.replies: list[Tensor] = []

    def send(self, header: Header, payload: Tensor | None = None) -> None:
        assert payload is not None and header.error == 0
        self.replies.append(payload.clone())


def hammer(role, payloads, exchanges: int):  # type: ignore[no-untyped-def]
    """p threads exchanging ``exchanges`` times each, two threads snapshotting meanwhile."""
    transports = {rank: RecordingTransport() for rank in payloads}
    evaluated: list[Tensor] = []
    checkpoints: list[tuple[Tensor, Tensor]] = []
    with tempfile.TemporaryDirectory() as tmp:
        runlog = RunLog(Path(tmp), tensorboard=False)
        server = ParameterServer(role, transports)  # type: ignore[arg-type]
        supervisor = Supervisor(
            server,
            lambda point: (evaluated.append(point), {"test_loss": 0.0, "test_error": 0.0})[1],
            runlog, Supervision(eval_interval_s=3600),
        )  # fmt: skip
        done = threading.Event()

        def worker(rank: int) -> None:
            receive = torch.empty(NUMEL, dtype=torch.float64)  # the transport's receive buffer
            for step in range(exchanges):
                receive.copy_(payloads[rank](transports[rank].replies))
                server._exchange(rank, transports[rank], Header(Op.EXCHANGE, step=step), receive)  # type: ignore[arg-type]

        def watch(take) -> None:  # type: ignore[no-untyped-def]
            """Call ``take`` once per distinct exchange count seen, at most SNAPSHOTS times (each
            keeps a copy of the center: unbounded, a slow machine's watchers ran out of memory)."""
            seen, taken = -1, 0
            while not done.is_set() and taken < SNAPSHOTS:
                if server.exchanges != seen:
                    seen, taken = server.exchanges, taken + 1
                    take()
                else:
                    done.wait(0.0002)

        def checkpoint() -> None:
            with server.lock:
                state = role.state_dict()
                truth = role.center.clone()
            checkpoints.append((state["center"], truth))  # compared after more updates

        workers = [threading.Thread(target=worker, args=(r,)) for r in payloads]
        watchers = [
            threading.Thread(target=watch, args=(supervisor._evaluate,)),
            threading.Thread(target=watch, args=(checkpoint,)),
        ]
        for thread in watchers + workers:
            thread.start()
        for thread in workers:
            thread.join()
        done.set()
        for thread in watchers:
            thread.join()
        runlog.close()
    return server, transports, evaluated, checkpoints


def test_concurrent_downpour_pushes_and_snapshots_are_never_torn() -> None:
    # worker r pushes (r + 1) * w every time, w integer-valued: any consistent center is k * w for
    # the integer k = sum of the pushes applied so far; a torn one mixes two k across chunks
    pattern = 1.0 + torch.arange(NUMEL, dtype=torch.float64) % 7
    workers, exchanges = 3, 25
    payloads = {r: (lambda replies, r=r: (r + 1) * pattern) for r in range(1, workers + 1)}
    role = DownpourServer(torch.zeros(NUMEL, dtype=torch.float64))
    server, transports, evaluated, checkpoints = hammer(role, payloads, exchanges)

    def prefix_sum(center: Tensor) -> int:
        ratio = center / pattern
        k = float(ratio[0])
        assert torch.equal(ratio, torch.full_like(ratio, k)) and k == int(k), "torn read"
        return int(k)

    total = sum(r + 1 for r in payloads) * exchanges
    assert server.exchanges == workers * exchanges and prefix_sum(role.center) == total
    replies = [prefix_sum(reply) for t in transports.values() for reply in t.replies]
    assert len(set(replies)) == len(replies)  # each reply is the center after a distinct update
    assert len(evaluated) >= 2 and len(checkpoints) >= 2
    for snapshot in evaluated:
        assert 0 <= prefix_sum(snapshot) <= total
    for state, truth in checkpoints:
        assert torch.equal(state, truth)  # a copy: later updates never reached it
        prefix_sum(state)


def test_concurrent_elastic_exchanges_conserve_and_snapshots_are_never_torn() -> None:
    # every variable starts constant across coordinates and each update acts on every coordinate
    # alike, so a consistent center is constant; center + sum of workers is conserved
    workers, exchanges = 4, 25
    xs = {r: torch.full((NUMEL,), float(3 * r), dtype=torch.float64) for r in range(1, workers + 1)}

    def payload(rank: int):  # type: ignore[no-untyped-def]
        def current(replies: list[Tensor]) -> Tensor:
            if replies:
                xs[rank] -= replies[-1]  # the worker applies the last reply, x_i <- x_i - e
            return xs[rank]

        return current

    role = ElasticServer(torch.zeros(NUMEL, dtype=torch.float64), moving_rate=0.2)
    server, transports, evaluated, checkpoints = hammer(
        role, {r: payload(r) for r in xs}, exchanges
    )
    for rank, transport in transports.items():
        xs[rank] -= transport.replies[-1]
    total = role.center + sum(xs.values())
    assert torch.allclose(total, torch.full_like(total, sum(3.0 * r for r in xs)), atol=1e-9)
    assert server.exchanges == workers * exchanges
    for snapshot in (
        evaluated
        + [s for s, _ in checkpoints]
        + [reply for t in transports.values() for reply in t.replies]
    ):
        assert torch.equal(snapshot, torch.full_like(snapshot, float(snapshot[0]))), "torn read"
    for state, truth in checkpoints:
        assert torch.equal(state, truth)
