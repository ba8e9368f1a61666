"""The all-reduce topology's snapshots, committed in the run's :class:`SnapshotLog`.

The ranks of ``topology=allreduce`` move in lockstep, so a consistent cut needs no marker: rank 0
announces snapshot k in the control slots of an exchange, and every rank saves its part
(``rank{r}-{k}.pt``: its variables, its copy of the center, its sampler) after that same step t.
Every exchange also carries, summed over the ranks, the newest snapshot number each rank has on
disk; the sum is p * k exactly when every part of k is saved (no rank has saved a newer one: only
k has been announced since), and then rank 0 commits k in ``committed.json`` and prunes the parts
that are no longer needed, as the server topology's server does. The final state is one more
snapshot, committed once an all-reduce confirms that every rank has saved it. A restarted job
resumes every rank from the newest committed snapshot. Numbers grow across restarts (they start
above every file on disk), so a part of an uncommitted snapshot is never mistaken for a committed
one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch

from easgd.comm.allreduce import all_ranks_max, all_ranks_min
from easgd.recovery.checkpoint import Checkpointer, CheckpointError, check_compatible
from easgd.recovery.snapshot import SnapshotLog

log = logging.getLogger("easgd")

Capture = Callable[[], dict[str, Any]]
"""This rank's state now, as its part of a snapshot."""


class RankSnapshots:
    """One rank's side of the snapshots: resume, save its parts, and (rank 0) commit and prune.

    Built before the first exchange on every rank, so every rank reads the same committed log
    and the same highest file number (no rank can save or commit before the first exchange).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        rank: int,
        *,
        num_workers: int,
        keep: int,
        capture: Capture | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.rank = rank
        self.device = device  # of the collectives in finish (NCCL needs CUDA tensors)
        self.num_workers = num_workers
        self.capture = capture
        self.checkpointer = Checkpointer(directory, f"rank{rank}")
        self.log = SnapshotLog(directory, keep=keep)
        committed = self.log.committed()
        self.resumable = committed[-1] if committed else None
        """The newest committed snapshot when the job started (None: none)."""
        self.committed: int | None = None
        """The newest snapshot committed by this attempt (None: none yet)."""
        self.next_number = self.log.highest_file_number() + 1
        self.saved = 0
        """The newest snapshot number whose part this rank has saved (0: none)."""

    def resume(self, signature: dict[str, Any]) -> dict[str, Any] | None:
        """This rank's part of the newest committed snapshot (None: none, start fresh)."""
        number = self.resumable
        if number is None:
            return None
        state = self.checkpointer.load(number)
        path = self.checkpointer.path(number)
        if state is None:
            raise CheckpointError(
                f"snapshot {number} is committed but {path} is missing; "
                "use a fresh run directory or checkpoint.resume=false"
            )
        check_compatible(state, path=path, signature=signature)
        log.info("resuming from snapshot %d (%s)", number, path)
        return state

    def save(self, number: int) -> None:
        """Save this rank's part of snapshot ``number`` (announced by rank 0 at this step)."""
        assert self.capture is not None
        self.checkpointer.save(self.capture(), number)
        self.saved, self.next_number = number, max(self.next_number, number + 1)

    def exchanged(self, saved_sum: float) -> None:
        """An exchange's sum of every rank's :attr:`saved`: commit once every part is on disk."""
        complete = self.saved and saved_sum == self.num_workers * self.saved
        if complete and self.saved != self.committed:
            self._commit(self.saved)

    def finish(self) -> None:
        """Save the final state as one more snapshot and commit it once every rank has (a
        collective: every rank calls it after the loop)."""
        number = all_ranks_max(self.next_number, device=self.device)
        self.save(number)
        if all_ranks_min(self.saved, device=self.device) == number:
            self._commit(number)

    def _commit(self, number: int) -> None:
        self.committed = number
        if self.rank != 0:
            return
        kept = self.log.commit(number)
        for rank in range(self.num_workers):
            Checkpointer(self.log.directory, f"rank{rank}").prune(kept)
