"""An own-loop run whose worker 1 is killed (SIGKILL) once a snapshot is committed (test script).

    RUN_DIR=... torchrun --standalone --nproc_per_node=3 --max-restarts=1 tests/own_loop_resume.py

Every rank builds the same float64 model; the workers' losses are linear in the parameters, so
worker i's gradient is the constant g_i wherever it stands, and the total of its optimizer's
local updates after S steps has a closed form (tests/test_own_loop.py). Elastic moves change
center + sum of x_i by nothing, so after the kill and torchrun's restart that sum equals
(p + 1) x_0 + the workers' local updates only if every process resumed one consistent state.

The script saves nothing itself: api.serve(run_dir=...) snapshots the run and the wrappers
restore their model, optimizer and step. Nothing here waits on time: in the first attempt the
workers step until a committed snapshot holds worker 1 at step 10 or later (it reads
committed.json and its part), then worker 1 kills itself and worker 2 steps on until the run is
torn down. ``OVERLAP=1`` runs exchanges in the background thread, ``NESTEROV=0`` heavy-ball
momentum instead of Nesterov's.
"""

import json
import os
import signal
from pathlib import Path

import torch
from torch import nn

from easgd import api
from easgd.recovery.checkpoint import Checkpointer, CheckpointError
from easgd.recovery.snapshot import SnapshotLog

STEPS = 200
"""Each worker's step budget in the attempt that finishes."""
MAX_STEPS = 100_000
"""A first attempt that steps this far has never seen a committed snapshot: a bug."""
MIN_PART_STEP = 10
"""Worker 1 is killed once a committed snapshot holds it at this step or later."""
LR, MOMENTUM, TAU = 0.01, 0.5, 2


def gradient_of(rank: int) -> torch.Tensor:
    """Worker ``rank``'s constant gradient (the same formula in the test)."""
    return torch.linspace(-1.0, 1.0, 16, dtype=torch.float64) * rank + 0.25 * rank


def all_joined(session: api.Session) -> None:
    """Wait until every worker has joined: each starts from the center it receives when it joins,
    so the sum below starts at (p + 1) x_0 only if no exchange moved the center before."""
    assert session.store is not None
    if session.store.add("test/joined", 1) == session.num_workers:
        session.store.set("test/all_joined", "1")
    session.store.wait(["test/all_joined"])


def committed_part_step(run_dir: Path, rank: int) -> int:
    """The step in this worker's part of the newest committed snapshot (-1: none yet)."""
    directory = run_dir / "checkpoints"
    number = SnapshotLog(directory).newest()
    if number is None:
        return -1
    try:  # a newer commit may prune it meanwhile: then look again after the next step
        state = Checkpointer(directory, f"worker{rank}").load(number)
    except CheckpointError:
        return -1
    return -1 if state is None else int(state["role"]["step"])


def x_of(model: nn.Linear, optimizer: api.ElasticOptimizer, nesterov: bool) -> torch.Tensor:
    """x_i: the parameters, less torch Nesterov's stored shift delta v = -lr delta b."""
    point = model.weight.detach().reshape(-1).clone()
    buffer = optimizer.state.get(model.weight, {}).get("momentum_buffer")
    if nesterov and buffer is not None:
        point += LR * MOMENTUM * buffer.reshape(-1)
    return point


def train(session: api.Session, model: nn.Linear, run_dir: Path) -> None:
    rank, first_attempt = session.env.rank, session.restart_count == 0
    nesterov = os.environ.get("NESTEROV", "1") == "1"
    optimizer = api.ElasticOptimizer(
        model,
        torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, nesterov=nesterov),
        session,
        comm_period=TAU,
        overlap=os.environ.get("OVERLAP") == "1",
    )
    print(f"worker {rank} resumed at step {optimizer.resumed_step}", flush=True)
    all_joined(session)
    grad = gradient_of(rank)
    while first_attempt or optimizer.local_step_count < STEPS:
        optimizer.zero_grad()
        (model.weight.reshape(-1) * grad).sum().backward()
        optimizer.step()
        if first_attempt and rank == 1 and committed_part_step(run_dir, rank) >= MIN_PART_STEP:
            os.kill(os.getpid(), signal.SIGKILL)  # as abrupt as a crash gets
        if optimizer.local_step_count >= MAX_STEPS:
            raise RuntimeError("no snapshot was committed in the first attempt")
    optimizer.close()
    final = {"x": x_of(model, optimizer, nesterov).tolist(), "steps": optimizer.local_step_count}
    (run_dir / f"final-worker{rank}.json").write_text(json.dumps(final))


def main() -> None:
    session = api.join()
    run_dir = Path(os.environ["RUN_DIR"])
    torch.manual_seed(0)
    model = nn.Linear(4, 4, bias=False, dtype=torch.float64)
    if session.is_server:
        (run_dir / "initial.json").write_text(json.dumps(model.weight.reshape(-1).tolist()))
        api.serve(model, session, run_dir=run_dir, eval_interval_s=0.05, checkpoint_every_s=0.02)
        center = model.weight.detach().reshape(-1).tolist()
        (run_dir / "final-center.json").write_text(json.dumps(center))
    else:
        train(session, model, run_dir)
    session.close()


if __name__ == "__main__":
    main()
