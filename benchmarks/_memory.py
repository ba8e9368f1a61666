"""Resident memory of this process (Linux /proc): current, and the peak since a reset."""

from __future__ import annotations

import contextlib
import ctypes
import os
from pathlib import Path


def rss_bytes() -> int:
    """Resident set size now."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> None:
    """Start a new peak (VmHWM) from the current resident size (Linux >= 4.0), after handing
    memory already freed (set-up temporaries glibc keeps in its heap) back to the system."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")


def peak_bytes() -> int:
    """Peak resident set size since the last :func:`reset_peak` (or the process start)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")
