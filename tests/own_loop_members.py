"""An own-loop run with workers that come and go: one process is killed (SIGKILL) mid-run.

    RUN_DIR=... KILL=worker torchrun --standalone --nproc_per_node=4 --max-restarts=0 \\
        tests/own_loop_members.py

``api.keep()`` makes each process torchrun started the keeper of this script, which it runs
again as a child. ``KILL=worker``: worker 2's first process kills itself at step ``KILL_AT``; its
keeper starts a new one, which joins the running server at the slot's step. ``KILL=server``: the
server's first process kills itself once every worker is holding at step ``HOLD_AT``; its keeper
starts a new one, which rebuilds the center from the base and the ledgers, and the workers rejoin
it with their own state. Nothing waits on time: the workers hold at ``HOLD_AT`` until the store
says the replacement is there (a worker's replacement has joined, or the second server is up),
so the kill and the rejoin happen while every other process is alive. ``ALGORITHM``: the
server's rule (default easgd).

Each worker process writes ``final-worker<rank>.json`` (its pid, keeper start and steps);
tests/test_own_loop_members.py checks them, the log and the run's summary.
"""

import json
import logging
import os
import signal
from pathlib import Path

import torch
from torch import nn

from easgd import api
from easgd.api.keeper import kept_start

STEPS = 300
"""Each worker slot's step budget."""
KILL_AT = 53
"""KILL=worker: worker 2's first process dies after this step (not an exchange step)."""
HOLD_AT = 120
"""Every worker holds at this step until the replacement is there."""
LR, MOMENTUM, TAU = 0.05, 0.5, 4


def target_of(rank: int) -> torch.Tensor:
    """Worker ``rank``'s optimum (each worker fits its own, so the center moves)."""
    return torch.linspace(-1.0, 1.0, 16, dtype=torch.float64).reshape(4, 4) * rank


def hold(session: api.Session, kill: str) -> None:
    """Wait at HOLD_AT until the replacement is there; KILL=server: the last worker to arrive
    tells the server to die."""
    store = session.store
    assert store is not None
    if kill == "worker":
        store.wait(["test/replaced"])
        return
    if store.add("test/holding", 1) == session.num_workers:
        store.set("test/kill_server", "1")
    store.wait(["server/up2"])  # the second server start (the store keys of easgd.comm.membership)


def train(session: api.Session, model: nn.Linear, run_dir: Path, kill: str) -> None:
    rank, start = session.env.rank, kept_start()
    assert session.store is not None
    optimizer = api.ElasticOptimizer(
        model,
        torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM),
        session,
        comm_period=TAU,
    )
    if rank == 2 and start > 1:
        session.store.set("test/replaced", "1")
    target = target_of(rank)
    while optimizer.local_step_count < STEPS:
        optimizer.zero_grad()
        loss = 0.5 * ((model.weight - target) ** 2).sum()
        loss.backward()
        optimizer.step(loss=loss)
        step = optimizer.local_step_count
        if kill == "worker" and rank == 2 and start == 1 and step == KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)  # as abrupt as a crash gets
        if step == HOLD_AT and kill:
            hold(session, kill)
    optimizer.close()
    final = {"pid": os.getpid(), "start": start, "steps": optimizer.local_step_count,
             "resumed_step": optimizer.resumed_step}  # fmt: skip
    (run_dir / f"final-worker{rank}.json").write_text(json.dumps(final))


def main() -> None:
    api.keep()  # first: in the process torchrun started it never returns
    kill = os.environ.get("KILL", "")
    rank = int(os.environ["RANK"])
    logging.basicConfig(level=logging.INFO, format=f"[rank{rank}] %(levelname)s %(message)s")
    session = api.join(membership=os.environ.get("MEMBERSHIP", "elastic"))
    run_dir = Path(os.environ["RUN_DIR"])
    torch.manual_seed(0)
    model = nn.Linear(4, 4, bias=False, dtype=torch.float64)
    if session.is_server:
        store = session.store
        assert store is not None

        def evaluate(model: nn.Module) -> dict[str, float]:
            if kill == "server" and kept_start() == 1 and store.check(["test/kill_server"]):
                os.kill(os.getpid(), signal.SIGKILL)
            return {"test_loss": 0.0, "test_error": 0.0}

        algorithm = os.environ.get("ALGORITHM", "easgd")
        api.serve(model, session, algorithm=algorithm, evaluate=evaluate, run_dir=run_dir,
                  eval_interval_s=0.05, checkpoint_every_s=0.2, tensorboard=False)  # fmt: skip
    else:
        train(session, model, run_dir, kill)
    session.close()


if __name__ == "__main__":
    main()
