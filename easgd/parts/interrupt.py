"""SIGINT and SIGTERM end a parameter-server run cleanly instead of killing it.

The first SIGINT or SIGTERM a process of the run receives only sets a flag: the server (every
shard) stops the run as a stop rule would, with ``stop_reason=interrupted``: each worker stops at
its next exchange and says DONE, a final snapshot is committed, summary.json is written, and the
launching shell prints the command that resumes the run. Ctrl-C under torchrun reaches every
process; SLURM preemption sends SIGTERM first, then SIGKILL after its grace period. Repeats of the
signal are ignored (torchrun forwards the terminal's SIGINT a second time).

A worker must not outlive the signal if it cannot stop: one that :func:`watch` es its training
loop ends on the signal after all (the default action) once the loop has not advanced for
``stuck_after_s`` since the signal, the same allowance after which the server declares a worker
hung. A stuck worker therefore still ends on torchrun's SIGTERM, as it did without this module.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType

log = logging.getLogger("easgd")

SIGNALS = (signal.SIGINT, signal.SIGTERM)
POLL_S = 0.1
"""How often a watched process checks whether its loop still advances after a signal."""

_requested = threading.Event()
_watched: tuple[Callable[[], int], float] | None = None


def requested() -> bool:
    """Whether this process has received SIGINT or SIGTERM since :func:`install`."""
    return _requested.is_set()


def watch(progress: Callable[[], int], *, stuck_after_s: float) -> None:
    """After a signal, end this process by it if ``progress()`` stops changing for
    ``stuck_after_s`` seconds (a worker whose loop is stuck cannot stop cleanly)."""
    global _watched
    _watched = (progress, stuck_after_s)


def _end_if_stuck(signum: int, progress: Callable[[], int], stuck_after_s: float) -> None:
    last, since = progress(), time.monotonic()
    while True:
        time.sleep(POLL_S)
        now = progress()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= stuck_after_s:
            log.error("%s: the loop is stuck; ending now", signal.Signals(signum).name)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return


def _handle(signum: int, frame: FrameType | None) -> None:
    if _requested.is_set():
        return
    _requested.set()
    log.warning(
        "%s: the run stops at the next exchange (final snapshot, summary.json)",
        signal.Signals(signum).name,
    )
    if _watched is not None:
        progress, stuck_after_s = _watched
        threading.Thread(
            target=_end_if_stuck, args=(signum, progress, stuck_after_s), daemon=True
        ).start()


def install() -> None:
    """Catch SIGINT and SIGTERM in this process from now on (call from the main thread)."""
    _requested.clear()
    for sig in SIGNALS:
        signal.signal(sig, _handle)


def uninstall() -> None:
    """Restore the default handlers, clear the flag and forget the watched loop."""
    global _watched
    _requested.clear()
    _watched = None
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
