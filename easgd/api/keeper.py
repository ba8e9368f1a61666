"""A keeper for a user's own script: the process torchrun starts runs the script again as a child.

With workers that come and go (``api.join(membership="elastic")``, see :mod:`easgd.api.members`)
the user's process *is* the worker, so something that outlives it has to start the next one.
``api.keep()``, called first thing in the script, makes the process torchrun started a keeper
(:class:`~easgd.topologies.keeper.ChildKeeper`, the rules of ``easgd.train``'s keeper): it runs
the same command line again (``sys.executable`` + ``sys.orig_argv``) as its child, with
``EASGD_KEEPER_START`` set to the child's start number, and starts a new one when the child dies
of anything but a clean end (``kill -9``, an out-of-memory kill, a crash after it joined), at
most ``max_respawns`` times. torchrun sees nothing, so the server and every other worker keep
their processes. In the child, ``api.keep()`` returns at once and the script goes on.

The child tells its keeper it has started (the server serves, or the worker's HELLO was
answered) by creating the file named in ``EASGD_KEEPER_STARTED``: a child that fails on its own
error before that would fail again, and the keeper gives up at once (exit code 1 for a script
that raises).

    torchrun --standalone --nproc_per_node=5 my_train.py   # my_train.py calls api.keep() first
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from easgd.comm.groups import under_launcher
from easgd.topologies.keeper import ChildKeeper, die_with_keeper

log = logging.getLogger("easgd.keeper")

KEEPER_START = "EASGD_KEEPER_START"
"""Set in a kept child: its start number (1: the first; a respawned one counts on)."""
KEEPER_STARTED = "EASGD_KEEPER_STARTED"
"""Set in a kept child: the file it creates once it serves or has joined its slot."""
KEEPER_PID = "EASGD_KEEPER_PID"
"""Set in a kept child: its keeper's pid (the child dies with it)."""


def kept_start() -> int:
    """This process's start number under :func:`keep` (0: not a kept child)."""
    return int(os.environ.get(KEEPER_START, "0"))


def mark_started() -> None:
    """Tell this process's keeper it has started: it serves, or its HELLO was answered."""
    flag = os.environ.get(KEEPER_STARTED)
    if flag:
        Path(flag).touch()


class ScriptChild:
    """The user's script run again, with multiprocessing's ``Process`` interface the keeper uses."""

    def __init__(self, command: list[str], env: dict[str, str]) -> None:
        self._process = subprocess.Popen(command, env=env)  # its output is the keeper's
        self.pid = self._process.pid

    def is_alive(self) -> bool:
        """Whether the script is still running."""
        return self._process.poll() is None

    def join(self, timeout: float | None = None) -> None:
        """Wait up to ``timeout`` seconds for the script to end."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(timeout)

    @property
    def exitcode(self) -> int | None:
        """Its exit code, -N for a signal N (as multiprocessing's), None while it runs."""
        return self._process.poll()

    def kill(self) -> None:
        """SIGKILL (the server declared it hung)."""
        self._process.kill()


class FileFlag:
    """A started flag that a child in another interpreter can set: a file's existence."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def is_set(self) -> bool:
        """Whether the child created the file."""
        return self.path.exists()


class ScriptKeeper(ChildKeeper):
    """Keeps ``command`` (the user's script) running on this rank, under the keeper's rules."""

    def __init__(
        self, command: list[str], flags: Path, *, max_respawns: int, store_timeout_s: float
    ) -> None:
        super().__init__(max_respawns=max_respawns, store_timeout_s=store_timeout_s)
        self.command = command
        self.flags = flags

    def start_child(self, starts: int) -> tuple[ScriptChild, FileFlag]:
        """The script again, told its start number and where to say it has started."""
        flag = FileFlag(self.flags / f"started-{starts}")
        env = {**os.environ, KEEPER_START: str(starts), KEEPER_STARTED: str(flag.path),
               KEEPER_PID: str(os.getpid())}  # fmt: skip
        return ScriptChild(self.command, env), flag


def check_max_respawns(max_respawns: int) -> None:
    """A ValueError naming the argument unless ``max_respawns`` is an int >= 0."""
    if isinstance(max_respawns, bool) or not isinstance(max_respawns, int) or max_respawns < 0:
        raise ValueError(f"api.keep(max_respawns={max_respawns!r}) must be an int >= 0")


def keep(*, max_respawns: int = 100, timeout_s: float = 120.0) -> None:
    """Make this process the keeper of the script it runs (call it first, before anything else).

    Under torchrun with its shared store (the default), the process torchrun started runs the
    script again as a child and keeps one running (see the module docstring), then exits with
    the last child's exit code; it never returns. In that child (and where there is nothing to
    keep: no torchrun, or ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``) it returns at once.
    ``max_respawns``: starts after which the keeper gives up (torchrun's own policy applies);
    ``timeout_s``: the rendezvous store's timeout.
    """
    check_max_respawns(max_respawns)
    if kept_start():
        if os.environ.get(KEEPER_PID):  # (set by the keeper; a test may play the child without it)
            die_with_keeper(int(os.environ[KEEPER_PID]))
        return
    if not under_launcher():
        return
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
        log.warning(
            "api.keep(): torchrun's shared store is off (TORCH_DISABLE_SHARE_RDZV_TCP_STORE), "
            "which workers that come and go need; running without a keeper"
        )
        return
    command = [sys.executable, *sys.orig_argv[1:]]
    with tempfile.TemporaryDirectory(prefix="easgd-keeper-") as flags:
        keeper = ScriptKeeper(
            command, Path(flags), max_respawns=max_respawns, store_timeout_s=timeout_s
        )
        code = keeper.run()
    raise SystemExit(code)
