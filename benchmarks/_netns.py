"""A bandwidth-limited link on this machine: a network namespace behind a veth pair shaped by
``tc tbf`` (used by clock_check.py and server_capacity.py).

The server side stays in this namespace at ``SERVER_IP`` on ``SERVER_END``; the other side, in the
namespace ``NAMESPACE``, is ``WORKER_IP`` on ``WORKER_END``. Both ends' egress is shaped to the
same rate, so each direction is limited. Only these two addresses are used, and
:func:`link_down` removes the namespace and the pair. Needs root and the ``ip`` and ``tc`` tools.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

NAMESPACE, SERVER_END, WORKER_END = "easgd-link", "veth-easgd-s", "veth-easgd-w"
SERVER_IP, WORKER_IP = "10.77.0.1", "10.77.0.2"
_CLONE_NEWNET = 0x40000000


def burst_bytes(rate_mbit: float) -> int:
    """The token bucket's depth: at least one 64 KiB segment (veth passes segments that large)
    and at least 10 ms of the rate, so a fast link is not held back by the kernel's timer."""
    return max(64 * 1024, int(rate_mbit * 1e6 / 8 / 100))


def link_up(rate_mbit: float) -> str | None:
    """Make the namespace and the shaped veth pair; None, or why it cannot be made here."""
    if os.geteuid() != 0 or not (shutil.which("ip") and shutil.which("tc")):
        return "needs root and the ip and tc tools"
    link_down()
    shape = ["root", "tbf", "rate", f"{rate_mbit}mbit", "burst", str(burst_bytes(rate_mbit)),
             "latency", "200ms"]  # fmt: skip
    inside = ["ip", "netns", "exec", NAMESPACE]
    steps = [
        ["ip", "netns", "add", NAMESPACE],
        ["ip", "link", "add", SERVER_END, "type", "veth", "peer", "name", WORKER_END],
        ["ip", "link", "set", WORKER_END, "netns", NAMESPACE],
        ["ip", "addr", "add", f"{SERVER_IP}/24", "dev", SERVER_END],
        ["ip", "link", "set", SERVER_END, "up"],
        [*inside, "ip", "addr", "add", f"{WORKER_IP}/24", "dev", WORKER_END],
        [*inside, "ip", "link", "set", WORKER_END, "up"],
        [*inside, "ip", "link", "set", "lo", "up"],
        ["tc", "qdisc", "add", "dev", SERVER_END, *shape],
        [*inside, "tc", "qdisc", "add", "dev", WORKER_END, *shape],
    ]
    for step in steps:
        result = subprocess.run(step, capture_output=True, text=True)
        if result.returncode != 0:
            link_down()
            return f"{' '.join(step)}: {result.stderr.strip()}"
    return None


def link_down() -> None:
    """Remove the namespace (and with it the veth pair)."""
    subprocess.run(["ip", "netns", "del", NAMESPACE], capture_output=True)
    subprocess.run(["ip", "link", "del", SERVER_END], capture_output=True)


def enter_namespace() -> None:
    """Move the calling thread, and every thread it starts from now on, into the namespace (call
    before any socket of the link is opened, e.g. before ``init_process_group``)."""
    fd = os.open(f"/var/run/netns/{NAMESPACE}", os.O_RDONLY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns into {NAMESPACE}: {os.strerror(errno)}")
    finally:
        os.close(fd)
