"""A progress bar for the server's console (tqdm): worker steps, exchanges/s, latest test error."""

from __future__ import annotations

import sys
import threading
import time

from tqdm import tqdm


class Progress:
    """Thread-safe progress over the total number of worker steps; a no-op when disabled."""

    def __init__(self, total_steps: int, *, enabled: bool = True) -> None:
        self._lock = threading.Lock()
        self._bar = (
            tqdm(
                total=total_steps, unit="step", dynamic_ncols=True, file=sys.stderr, mininterval=0.5
            )
            if enabled
            else None
        )
        self._started = time.perf_counter()
        self._exchanges = 0
        self._test_error: float | None = None

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
