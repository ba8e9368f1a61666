"""Process bodies for tests/test_pipeline.py: a server serving large elastic exchanges piece by
piece (or whole, to compare), with pieces shrunk so a small model travels in several."""

from __future__ import annotations

import tempfile
from typing import Any

import torch

from easgd.comm import compression, transport
from easgd.comm.compression import Compression
from easgd.comm.transport import CompressedTransport, PairTransport
from easgd.engine.server import ParameterServer, ServePolicy
from easgd.engine.supervisor import Supervision, Supervisor
from easgd.engine.worker import WorkerLoop, handshake
from easgd.parts.runlog import RunLog
from easgd.roles import ElasticServer, ElasticWorker, WorkerRole
from tests.protocol_targets import _groups

NUMEL = 300_001  # above FRAME_LIMIT (unframed); 5 pieces of 2^16, the last one partial
PIECE = 1 << 16


def _shrink_pieces() -> None:
    compression.FRAME_VALUES = transport.PIECE_VALUES = PIECE


def _transport(name: str, rank: int, peer: int, group: Any) -> PairTransport:
    if name == "none":
        return PairTransport(peer=peer, group=group, numel=NUMEL)
    return CompressedTransport(
        compression=Compression(name, True, True, NUMEL),
        worker=rank != 0,
        peer=peer,
        group=group,
        numel=NUMEL,
    )


def exchanges(
    rank: int,
    world: int,
    steps: int,
    name: str,
    pipelined: bool,
    poison_at: int,
    limit: float | None = 1e6,
) -> object:
    """EASGD with lr 0 from starts apart: the server returns (center, exchanges, rejected,
    whether it pipelined), each worker (params, start, resets). Worker 1 sends NaN at step
    ``poison_at`` (-1: never). ``limit``: the server's max_update_norm (None: the one-pass
    float32 path)."""
    _shrink_pieces()
    groups = _groups(rank, world)
    start = torch.linspace(-1, 1, NUMEL)
    if rank == 0:
        role = ElasticServer(start, moving_rate=0.3)
        transports = {r: _transport(name, 0, r, g) for r, g in groups.items()}
        server = ParameterServer(role, transports, ServePolicy(max_update_norm=limit))
        server.pipeline = pipelined
        with tempfile.TemporaryDirectory() as tmp:
            runlog = RunLog(tmp, tensorboard=False)
            outcome = Supervisor(
                server,
                lambda point: {"test_loss": 0.0, "test_error": 0.5},
                runlog,
                Supervision(eval_interval_s=3600, total_steps=len(groups) * steps),
            ).run()
            runlog.close()
        rejected = {r: s.rejected for r, s in server.stats.items()}
        used = all(transport_pipelines(server, t) for t in transports.values())
        return role.center, outcome.exchanges, rejected, used
    link = _transport(name, rank, 0, groups[rank])
    center = handshake(link)
    start_point = center + torch.linspace(0, rank, NUMEL)
    worker = ElasticWorker(start_point, comm_period=1, learning_rate=0.0, momentum=0.0)
    zero = torch.zeros(NUMEL)

    def poison(role: WorkerRole) -> None:
        if rank == 1 and role.step == poison_at:
            role.params[3] = float("nan")

    loop = WorkerLoop(worker, link, lambda point: (0.0, zero), steps=steps, after_step=poison)
    outcome = loop.run()
    return worker.params, start_point, outcome.resets


def transport_pipelines(server: ParameterServer, link: PairTransport) -> bool:
    from easgd.engine import pipeline

    return pipeline.pipelines(server, link)
