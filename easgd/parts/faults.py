"""Failure injection (the fault.* config): die, raise, hang or diverge as a machine fault would.

The only code that fires faults, in every topology: a worker's loop (server topology, sharded
center, all-reduce, the sequential baselines) calls :meth:`FaultInjector.worker_step` after each
local step, and a server or shard calls :meth:`FaultInjector.server_tick`. What a run cannot fire
is refused with the config (``easgd.config.schema._check_faults``). Kills, exceptions and hangs
fire only in the first start of a job (``generation`` 0, as every rank agrees), so a restarted
job succeeds.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

import torch

from easgd.config.schema import FaultConfig

log = logging.getLogger("easgd")


def kill_self(who: str, step: int) -> None:
    """Failure injection: die as abruptly as a machine fault would."""
    log.warning("fault injection: %s sends itself SIGKILL at step %d", who, step)
    logging.shutdown()
    os.kill(os.getpid(), signal.SIGKILL)


def hang_self(who: str, step: int, *, mode: str = "sigstop") -> None:
    """Hang: ``sigstop`` stops the whole process (its connections stay open); ``loop`` blocks
    only the training loop, so its other threads (a heartbeat thread) keep running."""
    if mode == "loop":
        log.warning("fault injection: %s's training loop blocks forever at step %d", who, step)
        threading.Event().wait()
    log.warning("fault injection: %s stops itself (SIGSTOP) at step %d", who, step)
    os.kill(os.getpid(), signal.SIGSTOP)


class FaultInjector:
    """The faults configured for one rank, checked at each of its steps."""

    def __init__(
        self,
        fault: FaultConfig,
        rank: int,
        *,
        generation: int,
        who: str | None = None,
        committed: Callable[[], bool] | None = None,
    ) -> None:
        self.fault = fault
        self.rank = rank
        self.first_start = generation == 0
        self.who = who or ("server" if rank == 0 else f"worker {rank}")
        self.committed = committed
        """Whether the run has a committed snapshot (for ``fault.kill_after_commit``)."""

    def _kill_due(self, count: int) -> bool:
        """The kill of this rank is due at step (or update) ``count``."""
        fault = self.fault
        if not self.first_start or fault.kill_rank != self.rank or count < fault.kill_at_step:
            return False
        if not fault.kill_after_commit:
            return True
        return self.committed is not None and self.committed()

    def worker_step(self, step: int, params: torch.Tensor) -> None:
        """Fire this worker's faults due at ``step`` (NaN: written into ``params`` in place)."""
        fault, rank = self.fault, self.rank
        if (step == fault.kill_at_step or fault.kill_after_commit) and self._kill_due(step):
            kill_self(self.who, step)
        if self.first_start:
            if fault.raise_rank == rank and step == fault.raise_at_step:
                raise RuntimeError(f"fault injection: {self.who} raises at step {step}")
            if fault.hang_rank == rank and step == fault.hang_at_step:
                hang_self(self.who, step, mode=fault.hang_mode)
        if fault.nan_rank == rank and step == fault.nan_at_step:
            log.warning("fault injection: %s parameters set to NaN at step %d", self.who, step)
            params.fill_(float("nan"))

    def watch_server(self, server: Any) -> None:
        """fault.raise_rank=0: the server raises in its exchange handling (a serve thread) once its
        role has made ``raise_at_step`` updates, as a bug in the server's own code would.

        Subscribes to ``server.before_update`` (:class:`easgd.engine.server.ParameterServer`):
        the update that would be number ``raise_at_step + 1`` raises instead of being applied.
        """
        if not (self.first_start and self.fault.raise_rank == 0):
            return
        role, at = server.role, self.fault.raise_at_step

        def raise_at(rank: int, payload: torch.Tensor | None) -> None:
            if role.updates >= at:
                raise RuntimeError(f"fault injection: the server raises at update {role.updates}")

        server.before_update.append(raise_at)

    def server_tick(self, updates: int) -> None:
        """A server's (or shard's) kill fires at a tick once it has made ``kill_at_step`` updates."""
        if self._kill_due(updates):
            kill_self(self.who, updates)
