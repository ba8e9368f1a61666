"""Process bodies for tests/test_compression_runtime.py: a real server and compressing workers."""

from __future__ import annotations

import tempfile
from typing import Any

import torch

from easgd.comm.compression import Compression
from easgd.comm.message import ServerRejected
from easgd.comm.transport import CompressedTransport, PairTransport
from easgd.engine.server import ParameterServer
from easgd.engine.supervisor import Supervision, Supervisor
from easgd.engine.worker import WorkerLoop, handshake
from easgd.parts.runlog import RunLog
from easgd.roles import (
    DownpourServer,
    DownpourWorker,
    ElasticServer,
    ElasticWorker,
    ServerRole,
    WorkerRole,
)
from tests.protocol_targets import _groups

NUMEL = 700  # three int8 blocks of 256, the last one partial


def _transport(name: str, elastic: bool, rank: int, peer: int, group: Any) -> PairTransport:
    if name == "none":
        return PairTransport(peer=peer, group=group, numel=NUMEL)
    compression = Compression(name, True, elastic, NUMEL)
    return CompressedTransport(
        compression=compression, worker=rank != 0, peer=peer, group=group, numel=NUMEL
    )


def _serve(role: ServerRole, groups: dict, steps: int, name: str, elastic: bool) -> tuple:
    transports = {r: _transport(name, elastic, 0, r, g) for r, g in groups.items()}
    with tempfile.TemporaryDirectory() as tmp:
        runlog = RunLog(tmp, tensorboard=False)
        server = ParameterServer(role, transports)
        supervisor = Supervisor(
            server,
            lambda point: {"test_loss": float(point.sum()), "test_error": 0.5},
            runlog,
            Supervision(eval_interval_s=0.05, total_steps=len(groups) * steps),
        )
        outcome = supervisor.run()
        runlog.close()
    return role.center, outcome.exchanges, {r: s.rejected for r, s in server.stats.items()}


def conservation(rank: int, world: int, steps: int, name: str, poison_at: int) -> object:
    """EASGD, lr 0, workers started apart, compressed: center + sum(workers) is conserved.
    Worker 1 sends NaN at step ``poison_at`` (-1: never): refused, it restarts from the center."""
    groups = _groups(rank, world)
    start = torch.linspace(-1, 1, NUMEL)
    if rank == 0:
        return _serve(ElasticServer(start, moving_rate=0.3), groups, steps, name, True)
    transport = _transport(name, True, rank, 0, groups[rank])
    center = handshake(transport)
    start_point = center + torch.linspace(0, rank, NUMEL)
    role = ElasticWorker(start_point, comm_period=1, learning_rate=0.0, momentum=0.0)
    zero = torch.zeros(NUMEL)

    def poison(worker: WorkerRole) -> None:
        if rank == 1 and worker.step == poison_at:
            worker.params[3] = float("nan")

    loop = WorkerLoop(role, transport, lambda point: (0.0, zero), steps=steps, after_step=poison)
    outcome = loop.run()
    return role.params, start_point, outcome.exchanges, outcome.resets


def downpour(rank: int, world: int, steps: int, name: str) -> object:
    """DOWNPOUR, compressed pushes with error feedback: center = sum of pushes - residuals."""
    groups = _groups(rank, world)
    if rank == 0:
        return _serve(DownpourServer(torch.zeros(NUMEL)), groups, steps, name, False)
    transport = _transport(name, False, rank, 0, groups[rank])
    role = DownpourWorker(handshake(transport), comm_period=1, learning_rate=1.0)
    generator = torch.Generator().manual_seed(rank)
    grads = [torch.randn(NUMEL, generator=generator) * 1e-2 for _ in range(steps)]
    counter = iter(grads)
    WorkerLoop(role, transport, lambda point: (0.0, next(counter)), steps=steps).run()
    assert isinstance(transport, CompressedTransport) and transport.link is not None
    residual = transport.link.up_increment.residual
    assert residual is not None
    # pushes at t = 1..steps-1 carry grads[0..steps-2]; the last step's gradient is never pushed
    return sum(grads[:-1]), residual, role.params


def mismatch(rank: int, world: int) -> object:
    """A worker compressing with int8 says HELLO to a float32 server: refused with a message."""
    groups = _groups(rank, world)
    if rank == 0:
        try:
            _serve(ElasticServer(torch.zeros(NUMEL), moving_rate=0.3), groups, 5, "none", True)
        except RuntimeError as err:  # fail_fast: the lost worker ends the run
            return str(err)
        return "served"
    try:
        handshake(_transport("int8", True, rank, 0, groups[rank]))
    except ServerRejected as err:
        return str(err)
    return "accepted"
