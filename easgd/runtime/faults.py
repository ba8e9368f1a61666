"""Failure injection (the fault.* config): die or hang as abruptly as a machine fault would."""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger("easgd")


def kill_self(who: str, step: int) -> None:
    """Failure injection: die as abruptly as a machine fault would."""
    log.warning("fault injection: %s sends itself SIGKILL at step %d", who, step)
    logging.shutdown()
    os.kill(os.getpid(), signal.SIGKILL)


def hang_self(who: str, step: int) -> None:
    """Stop this process (SIGSTOP): its connections stay open, only heartbeats reveal it."""
    log.warning("fault injection: %s stops itself (SIGSTOP) at step %d", who, step)
    os.kill(os.getpid(), signal.SIGSTOP)
