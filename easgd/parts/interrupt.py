"""SIGINT and SIGTERM end a parameter-server run cleanly instead of killing it.

The first SIGINT or SIGTERM a process of the run receives only sets a flag: the server (every
shard) stops the run as a stop rule would, with ``stop_reason=interrupted``: each worker stops at
its next exchange and says DONE, a final snapshot is committed, summary.json is written, and the
launching shell prints the command that resumes the run. Ctrl-C under torchrun reaches every
process; SLURM preemption sends SIGTERM first, then SIGKILL after its grace period. Repeats of the
signal are ignored (torchrun forwards the terminal's SIGINT a second time); the launcher's own
deadline (30 s under torchrun) still kills a process that does not end.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

log = logging.getLogger("easgd")

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_requested = threading.Event()


def requested() -> bool:
    """Whether this process has received SIGINT or SIGTERM since :func:`install`."""
    return _requested.is_set()


def _handle(signum: int, frame: FrameType | None) -> None:
    if not _requested.is_set():
        _requested.set()
        log.warning(
            "%s: the run stops at the next exchange (final snapshot, summary.json)",
            signal.Signals(signum).name,
        )


def install() -> None:
    """Catch SIGINT and SIGTERM in this process from now on (call from the main thread)."""
    _requested.clear()
    for sig in SIGNALS:
        signal.signal(sig, _handle)


def uninstall() -> None:
    """Restore the default handlers and clear the flag."""
    _requested.clear()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
