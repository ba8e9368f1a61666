"""Conservation audit of a committed snapshot (runs with ``checkpoint.ledger=true``).

With consistent snapshots, the center of snapshot k is the initial center plus every worker's
ledger (the sum of the center changes its exchanges caused) as saved in the same snapshot. A cut
that counted an exchange on one side only, or a push applied twice after a restart, breaks it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from omegaconf import OmegaConf

from easgd.config.schema import validate
from easgd.parts.assembly import RunParts
from easgd.parts.build import build_split
from easgd.recovery.checkpoint import Checkpointer
from easgd.recovery.resume import load_worker_part
from easgd.recovery.snapshot import SnapshotLog


def conservation_gap(run_dir: str | os.PathLike[str], number: int | None = None) -> float:
    """max |center - (initial center + sum of ledgers)| over snapshot ``number`` (default: the
    newest committed one) of the run in ``run_dir`` (its summary.json gives the config)."""
    run_dir = Path(run_dir)
    cfg = validate(OmegaConf.create(json.loads((run_dir / "summary.json").read_text())["config"]))
    directory = run_dir / "checkpoints"
    if number is None:
        number = SnapshotLog(directory).committed()[-1]
    shards = cfg.server.shards
    names = ["server"] if shards == 1 else [f"shard{j}" for j in range(shards)]
    slices = []
    for name in names:  # a sharded center is the concatenation of its slices
        part = Checkpointer(directory, name).load(number)
        if part is None:
            raise ValueError(f"snapshot {number} has no {name} part in {directory}")
        slices.append(part["role"]["center"].to(torch.float64))
    center = torch.cat(slices)
    initial = RunParts(cfg, build_split(cfg.data)).flat_model().initial_point()
    expected = initial.to(torch.float64)
    for rank in range(shards, shards + cfg.workers):
        part = load_worker_part(Checkpointer(directory, f"worker{rank}"), number)
        if part is None or "ledger" not in part:
            raise ValueError(f"worker {rank} has no ledger in snapshot {number}")
        expected = expected + part["ledger"]
    return float((center - expected).abs().max())


def membership_gap(run_dir: str | os.PathLike[str]) -> float:
    """max |center - (base + every member's ledger)| at the end of a ``membership.mode=elastic``
    run (its final committed snapshot): the base is the center the job's first server started
    from, each ledger the center changes one member's exchanges caused (written by the server
    when the member left or finished)."""
    from easgd.engine.members import LEDGER_BASE

    directory = Path(run_dir) / "checkpoints"
    number = SnapshotLog(directory).committed()[-1]
    part = Checkpointer(directory, "server").load(number)
    if part is None:
        raise ValueError(f"snapshot {number} has no server part in {directory}")
    expected = torch.load(directory / LEDGER_BASE).clone()
    for path in sorted(directory.glob("ledger-slot*.pt")):
        expected += torch.load(path)
    return float((part["role"]["center"].to(torch.float64) - expected).abs().max())
