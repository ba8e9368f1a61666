"""An own-loop worker's part of the run's consistent snapshots, and its restore after a restart.

``api.serve(run_dir=...)`` runs the marker cut of :mod:`easgd.recovery.snapshot` with the same
:class:`~easgd.recovery.snapshot.SnapshotWriter` as ``easgd.train``'s server, and publishes in its
run description where the checkpoints go and which committed snapshot it resumed from. Each
:class:`~easgd.api.ElasticOptimizer` then saves its part when a reply is marked: the state it had
when it sent that exchange (the model's trainable parameters as stored, so x_i with torch
Nesterov's shift, its buffers, the user's optimizer state, t_i and the role's own variables:
DOWNPOUR's a_i, an overlapped move received and not applied yet). After a torchrun restart the
wrapper loads its part of that same snapshot before it says HELLO, so every process resumes
one state the run was in.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from easgd.api.roles import OptimizerRole
from easgd.recovery.checkpoint import Checkpointer
from easgd.recovery.resume import resume_worker_part
from easgd.recovery.snapshot import WorkerSnapshots


def run_description(
    directory: Path | None, number: int | None, signature: dict[str, Any]
) -> dict[str, Any]:
    """Server: what its workers need to take part in the snapshots (see :meth:`WorkerPart.of_run`)."""
    if directory is None:
        return {}
    return {"checkpoints": str(directory), "snapshot": number or 0, "signature": signature}


class WorkerPart:
    """Where an own-loop worker's parts live, and what goes into one."""

    def __init__(
        self, directory: str | Path, rank: int, number: int | None, signature: dict[str, Any]
    ) -> None:
        self.checkpointer = Checkpointer(directory, f"worker{rank}")
        self.number = number
        """The committed snapshot the server resumed from (None: a fresh run)."""
        self.signature = signature

    @classmethod
    def of_run(cls, run: dict[str, Any], rank: int) -> WorkerPart | None:
        """From the server's run description (None: the server writes no checkpoints)."""
        directory = run.get("checkpoints")
        if not directory:
            return None
        number = int(run.get("snapshot") or 0) or None
        return cls(directory, rank, number, dict(run.get("signature") or {}))

    def load(self) -> dict[str, Any] | None:
        """This worker's part of the server's snapshot (None: start fresh)."""
        return resume_worker_part(self.checkpointer, self.number, self.signature)

    def snapshots(self, role: OptimizerRole, model: nn.Module) -> WorkerSnapshots:
        """The WorkerLoop's side of the cut: saves :func:`capture` when a reply is marked."""
        return WorkerSnapshots(self.checkpointer, lambda: capture(role, model, self.signature))


def capture(role: OptimizerRole, model: nn.Module, signature: dict[str, Any]) -> dict[str, Any]:
    """A copy of this worker's state now (the role's variables, optimizer state, buffers)."""
    return {
        "role": role.state_dict(),
        "optimizer": copy.deepcopy(role.optimizer.state_dict()),
        "buffers": {name: b.detach().clone() for name, b in model.named_buffers()},
        "signature": signature,
    }


def restore(role: OptimizerRole, model: nn.Module, state: dict[str, Any]) -> None:
    """Load what :func:`capture` saved into the model, the optimizer and the role."""
    role.load_state_dict(state["role"])
    role.optimizer.load_state_dict(state["optimizer"])
    buffers = state["buffers"]
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])
