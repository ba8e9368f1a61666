"""A progress bar for the server's console (tqdm): worker steps, exchanges/s, latest test error.

The bar shows only on a terminal: when the stream it writes to (stderr) is not a TTY (a batch
log, ``> log 2>&1``, SLURM's output file, a pipe) it turns itself off, so logs hold no carriage
returns. ``progress=false`` turns it off on a terminal too; ``progress=true`` does not force it
on for a non-TTY (a bar redrawn in a file is noise, and the run's log lines say the same).
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

from tqdm import tqdm


def is_terminal(stream: TextIO) -> bool:
    """Whether ``stream`` is an interactive terminal (False for files, pipes, closed streams)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Progress:
    """Thread-safe progress over the total number of worker steps; a no-op when disabled.

    ``enabled``: the run asks for a bar (``progress``); it shows only if ``stream`` (default:
    stderr) is a terminal.
    """

    def __init__(
        self, total_steps: int, *, enabled: bool = True, stream: TextIO | None = None
    ) -> None:
        stream = sys.stderr if stream is None else stream
        self._lock = threading.Lock()
        self._bar = (
            tqdm(total=total_steps, unit="step", dynamic_ncols=True, file=stream, mininterval=0.5)
            if enabled and is_terminal(stream)
            else None
        )
        self._started = time.perf_counter()
        self._exchanges = 0
        self._test_error: float | None = None

    @property
    def shown(self) -> bool:
        """Whether a bar is drawn."""
        return self._bar is not None

    def advance(self, steps: int, *, exchanges: int) -> None:
        """Count ``steps`` more worker steps; ``exchanges`` is the running total."""
        if self._bar is None:
            return
        with self._lock:
            self._exchanges = exchanges
            self._bar.update(max(0, steps))

    def note(self, *, test_error: float) -> None:
        """Show the latest test error (and the exchange rate) after the bar."""
        if self._bar is None:
            return
        with self._lock:
            rate = self._exchanges / max(1e-9, time.perf_counter() - self._started)
            self._bar.set_postfix(exch_per_s=f"{rate:.0f}", test_err=f"{100 * test_error:.2f}%")

    def close(self) -> None:
        """Finish the bar."""
        if self._bar is not None:
            self._bar.close()
