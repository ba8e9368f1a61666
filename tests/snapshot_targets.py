"""Process bodies for tests/test_snapshots.py: a real server and workers over gloo pair groups,
taking consistent snapshots, one of them dying abruptly, then every process resuming."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from easgd.comm.groups import DistEnv, init_pair_groups
from easgd.comm.transport import PairTransport
from easgd.engine.server import ParameterServer, Resumed
from easgd.engine.supervisor import Supervision, Supervisor
from easgd.engine.worker import WorkerLoop, handshake
from easgd.parts.runlog import RunLog
from easgd.recovery.checkpoint import Checkpointer
from easgd.recovery.resume import load_worker_part
from easgd.recovery.snapshot import SnapshotCut, SnapshotLog, SnapshotWriter, WorkerSnapshots
from easgd.roles import DownpourServer, DownpourWorker, ElasticServer, ElasticWorker

NUMEL = 16
START = torch.linspace(-1, 1, NUMEL, dtype=torch.float64)


def _transport(peer: int, group: object) -> PairTransport:
    return PairTransport(peer=peer, group=group, numel=NUMEL, dtype=torch.float64)  # type: ignore[arg-type]


def _serve(role, groups: dict, directory: Path, every_s: float) -> tuple:  # type: ignore[no-untyped-def]
    log = SnapshotLog(directory)
    committed = log.committed()
    finished_before: set[int] = set()
    if committed:
        state = Checkpointer(directory, "server").load(committed[-1])
        assert state is not None
        role.load_state_dict(state["role"])
        finished_before = set(state["finished"])
    transports = {r: _transport(r, g) for r, g in groups.items()}
    with tempfile.TemporaryDirectory() as tmp:
        runlog = RunLog(tmp, tensorboard=False)
        cut = SnapshotCut(next_number=log.next_number())
        server = ParameterServer(
            role,
            transports,
            resumed=Resumed(finished=frozenset(finished_before)),
            snapshots=cut,
        )
        supervisor = Supervisor(
            server,
            lambda point: {"test_loss": 0.0, "test_error": 0.5},
            runlog,
            Supervision(eval_interval_s=0.01),
        )
        names = ["server", *(f"worker{r}" for r in transports)]
        writer = SnapshotWriter(cut, supervisor, directory, every_s=every_s, names=names)
        supervisor.on_tick.append(writer.tick)
        try:
            supervisor.run()
            writer.finish()
            crashed = False
        except RuntimeError:  # a worker died (fail_fast): the committed snapshot stays
            crashed = True
        runlog.close()
    return role.center.numpy(), crashed, log.committed()  # numpy: pickled by value


def _work(
    rank: int,
    groups: dict,
    directory: Path,
    make_role,
    gradient,
    steps: int,
    crash_at: int | None,
    overlap: bool = False,
):  # type: ignore[no-untyped-def]
    transport = _transport(0, groups[rank])
    checkpointer = Checkpointer(directory, f"worker{rank}")
    committed = SnapshotLog(directory).committed()
    state = load_worker_part(checkpointer, committed[-1] if committed else None)
    resumed = int(state["role"]["step"]) if state is not None else 0
    role = make_role(handshake(transport, step=resumed))
    if state is not None:
        role.load_state_dict(state["role"])

    def capture() -> dict:
        return {
            "role": {
                k: v.clone() if isinstance(v, torch.Tensor) else v
                for k, v in role.state_dict().items()
            }
        }

    def after_step(role) -> None:  # type: ignore[no-untyped-def]
        if role.step == crash_at:
            os._exit(3)  # as abrupt as kill -9: no DONE, no final state

    loop = WorkerLoop(
        role,
        transport,
        gradient,
        steps=steps,
        overlap=overlap,
        after_step=after_step,
        snapshots=WorkerSnapshots(checkpointer, capture),
    )
    loop.run()
    return role.params.numpy(), resumed


def elastic(
    rank: int,
    world: int,
    directory: str,
    steps: int,
    crash_rank: int,
    crash_at: int | None,
    overlap: bool,
) -> object:
    """EASGD with learning rate 0 and workers started apart: center + sum(x_i) never changes."""
    groups = init_pair_groups(DistEnv(rank, world, rank, 0), backend="gloo", timeout_s=30).groups
    if rank == 0:
        return _serve(ElasticServer(START, moving_rate=0.3), groups, Path(directory), 0.01)

    def make_role(center: torch.Tensor) -> ElasticWorker:
        # a fresh worker starts at START + rank whatever the center, so the total is known
        return ElasticWorker(START + rank, comm_period=1, learning_rate=0.0, momentum=0.0)

    zero = torch.zeros(NUMEL, dtype=torch.float64)

    def gradient(point: torch.Tensor) -> tuple[float, torch.Tensor]:
        import time

        time.sleep(0.002)  # slow enough for several snapshots to commit before the crash
        return 0.0, zero

    crash = crash_at if rank == crash_rank else None
    return _work(rank, groups, Path(directory), make_role, gradient, steps, crash, overlap)


def downpour(
    rank: int,
    world: int,
    directory: str,
    steps: int,
    crash_rank: int,
    crash_at: int | None,
    period: int,
) -> object:
    """DOWNPOUR with a constant gradient per worker: the center is exactly the sum of the pushes."""
    groups = init_pair_groups(DistEnv(rank, world, rank, 0), backend="gloo", timeout_s=30).groups
    if rank == 0:
        return _serve(
            DownpourServer(torch.zeros(NUMEL, dtype=torch.float64)), groups, Path(directory), 0.01
        )
    grad = torch.full((NUMEL,), 0.125 * rank, dtype=torch.float64)

    def gradient(point: torch.Tensor) -> tuple[float, torch.Tensor]:
        import time

        time.sleep(0.002)
        return 0.0, grad

    return _work(
        rank,
        groups,
        Path(directory),
        lambda center: DownpourWorker(center, comm_period=period, learning_rate=1.0),
        gradient,
        steps,
        crash_at if rank == crash_rank else None,
    )
