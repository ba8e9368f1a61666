"""An own-loop run that checkpoints as a user would and whose worker 1 crashes once (test script).

    RUN_DIR=... torchrun --standalone --nproc_per_node=3 --max-restarts=1 tests/own_loop_resume.py

The server checkpoints the center (api.serve); each worker saves its model and the wrapper's
state_dict every 10 steps with torch.save, and resumes from them after torchrun's restart.
"""

import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from easgd import api

STEPS, CRASH_AT = 60, 35


def main() -> None:
    session = api.join()
    run_dir = Path(os.environ["RUN_DIR"])
    torch.manual_seed(0)
    model = nn.Linear(8, 2)
    if session.is_server:
        test_x = torch.randn(512, 8, generator=torch.Generator().manual_seed(99))

        @torch.no_grad()
        def evaluate(m: nn.Module) -> dict[str, float]:
            wrong = (m(test_x).argmax(1) != (test_x[:, 0] > 0).long()).float().mean()
            return {"test_error": float(wrong)}

        api.serve(
            model,
            session,
            evaluate=evaluate,
            run_dir=run_dir,
            eval_interval_s=0.05,
            checkpoint_every_s=0.01,
        )
        return session.close()
    rank = session.env.rank
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, nesterov=True)
    optimizer = api.ElasticOptimizer(model, optimizer, session, comm_period=2)
    checkpoint = run_dir / f"worker{rank}.pt"
    scratch = run_dir / f"worker{rank}.tmp"  # one per worker: both save at the same steps
    if checkpoint.exists():
        state = torch.load(checkpoint)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        print(f"worker {rank} resumed at step {optimizer.local_step_count}", flush=True)
    generator = torch.Generator().manual_seed(rank * 1000 + optimizer.local_step_count)
    while optimizer.local_step_count < STEPS:
        inputs = torch.randn(32, 8, generator=generator)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(inputs), (inputs[:, 0] > 0).long())
        loss.backward()
        optimizer.step(loss=loss)
        time.sleep(0.01)  # let the server checkpoint a few times before the crash
        if optimizer.local_step_count % 10 == 0:
            torch.save(
                {"model": model.state_dict(), "optimizer": optimizer.state_dict()},
                scratch,
            )
            os.replace(scratch, checkpoint)
        if session.restart_count == 0 and rank == 1 and optimizer.local_step_count == CRASH_AT:
            os._exit(3)  # a crash: no DONE, no cleanup
    optimizer.close()
    session.close()


if __name__ == "__main__":
    main()
