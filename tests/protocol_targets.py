"""Process bodies for tests/test_protocol.py: a real server and workers over gloo pair groups."""

from __future__ import annotations

import tempfile
import time

import torch

from easgd.comm.groups import DistEnv, init_pair_groups
from easgd.comm.message import Header, Op
from easgd.comm.transport import Delay, PairTransport
from easgd.engine.server import ParameterServer
from easgd.engine.supervisor import Supervision, Supervisor
from easgd.engine.worker import WorkerLoop, handshake
from easgd.parts.runlog import RunLog
from easgd.roles import DownpourServer, DownpourWorker, ElasticServer, ElasticWorker

NUMEL = 16


def _groups(rank: int, world: int) -> dict:
    return init_pair_groups(DistEnv(rank, world, rank, 0), backend="gloo", timeout_s=30).groups


def _serve(role, groups: dict, steps: int) -> tuple:  # type: ignore[no-untyped-def]
    transports = {
        r: PairTransport(peer=r, group=g, numel=NUMEL, dtype=torch.float64)
        for r, g in groups.items()
    }
    with tempfile.TemporaryDirectory() as tmp:
        runlog = RunLog(tmp, tensorboard=False)
        supervisor = Supervisor(
            ParameterServer(role, transports),
            lambda point: {"test_loss": float(point.sum()), "test_error": 0.5},
            runlog,
            Supervision(eval_interval_s=0.05, total_steps=len(groups) * steps),
        )
        outcome = supervisor.run()
        runlog.close()
    return role.center, outcome.exchanges


def conservation(rank: int, world: int, steps: int, overlap: bool) -> object:
    """EASGD with learning rate 0 and workers started apart: center + sum(workers) is conserved."""
    groups = _groups(rank, world)
    start = torch.linspace(-1, 1, NUMEL, dtype=torch.float64)
    if rank == 0:
        return _serve(ElasticServer(start, moving_rate=0.3), groups, steps)
    transport = PairTransport(peer=0, group=groups[rank], numel=NUMEL, dtype=torch.float64)
    center = handshake(transport)
    # the center may already have moved when this worker joins, so it reports where it started
    start_point = center + torch.full((NUMEL,), float(rank), dtype=torch.float64)
    role = ElasticWorker(start_point, comm_period=1, learning_rate=0.0, momentum=0.0)
    zero = torch.zeros(NUMEL, dtype=torch.float64)
    loop = WorkerLoop(role, transport, lambda point: (0.0, zero), steps=steps, overlap=overlap)
    outcome = loop.run()
    return role.params, start_point, outcome.exchanges, outcome.max_overlap_staleness


def downpour_sum(rank: int, world: int, steps: int, period: int) -> object:
    """DOWNPOUR with a constant gradient per worker: every push lands on the center exactly."""
    groups = _groups(rank, world)
    start = torch.zeros(NUMEL, dtype=torch.float64)
    if rank == 0:
        return _serve(DownpourServer(start), groups, steps)
    transport = PairTransport(peer=0, group=groups[rank], numel=NUMEL, dtype=torch.float64)
    role = DownpourWorker(handshake(transport), comm_period=period, learning_rate=1.0)
    grad = torch.full((NUMEL,), 0.125 * rank, dtype=torch.float64)
    WorkerLoop(role, transport, lambda point: (0.0, grad), steps=steps).run()
    return grad


def latency(rank: int, world: int, latency_ms: float, messages: int) -> object:
    """Worker sends with injected latency; the server echoes. Returns the worker's round trips."""
    groups = _groups(rank, world)
    delay = Delay(latency_ms=latency_ms) if rank == 1 else Delay()
    transport = PairTransport(peer=1 - rank, group=groups[1], numel=NUMEL, delay=delay)
    payload = torch.ones(NUMEL)
    if rank == 0:
        for _ in range(messages):
            header, body = transport.recv()
            transport.send(Header(Op.REPLY), body)
        return None
    times = []
    for _ in range(messages):
        started = time.perf_counter()
        transport.send(Header(Op.EXCHANGE), payload)
        transport.recv()
        times.append(time.perf_counter() - started)
    return times
