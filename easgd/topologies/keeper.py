"""The process torchrun starts, under ``membership.mode=elastic``: it keeps its slot filled.

torchrun restarts every process of a job when one of them dies. So with elastic membership the
process torchrun starts (a *keeper*, one per rank) does no training itself: it runs its rank's
part (the server on rank 0, a worker on the others) in a child process, and when the child dies
of anything but a clean end (``kill -9``, an out-of-memory kill, a crash) it starts a new one,
which rejoins the running server (:mod:`easgd.topologies.elastic`). torchrun sees nothing; the
server and every other worker go on. A child that ends normally (exit code 0: its slot finished,
the run ended or its slot was taken) ends the keeper. A child that fails before it has started
(the server: before it serves; a worker: before its HELLO was answered) with an error of its own
(a wrong launch or model, not a signal) would fail again: the keeper exits with its code at once;
so does one whose child failed on its own error after the run was marked over (the server marks
it on the way out when it raises, so a new server does not wait for members that have left).
After ``membership.max_respawns`` starts the keeper gives up and exits with the child's code, and
torchrun's own policy applies.

SIGINT and SIGTERM are passed to the child (an interrupted run ends as without a keeper), and no
new child is started after one.

The rules are :class:`ChildKeeper`'s, over any child; :class:`Keeper` runs easgd.train's part,
and ``api.keep()`` (:mod:`easgd.api.keeper`) keeps a user's own script with the same rules.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import time
from typing import Any

from easgd.config.schema import TrainConfig, to_dict

log = logging.getLogger("easgd.keeper")

EVICT_CHECK_S = 0.5
"""How often a keeper checks whether the server asked it to kill its (hung) child."""

RESPAWN_PAUSE_S = 0.2
"""Pause before a new child, so a child that dies at once does not spin."""


def die_with_keeper(keeper_pid: int) -> None:
    """In a kept child: be killed (SIGKILL) when the keeper ``keeper_pid`` dies, and end now if
    it already has. A ``kill -9`` of a keeper must not leave its child running without it: the
    orphan would hold the slot while torchrun restarts the rank (Linux only; elsewhere nothing)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != keeper_pid:  # it died before the line above
            os._exit(1)


PR_SET_PDEATHSIG = 1
"""prctl(2): the signal this process gets when its parent dies."""


def _member_entry(
    config: dict[str, Any], incarnation: int, started: Any, slot: Any, keeper_pid: int
) -> None:
    """The child: this rank's part of an elastic run (it sets ``started`` once it serves or
    has joined its slot, and ``slot`` to the slot it holds)."""
    die_with_keeper(keeper_pid)
    from omegaconf import OmegaConf

    from easgd.config.schema import validate
    from easgd.topologies.elastic import run_member

    cfg = validate(OmegaConf.create(config))
    run_member(cfg, incarnation=incarnation, started=started, slot_box=slot)


class ChildKeeper:
    """The keeper's rules over a child of any kind; :meth:`start_child` starts one.

    A child has multiprocessing's ``Process`` interface (``pid``, ``is_alive``, ``join``,
    ``exitcode``, ``kill``); its *started* flag has ``is_set``. :class:`Keeper` runs easgd.train's
    part in a spawned process, :class:`easgd.api.keeper.ScriptKeeper` a user's own script again.
    """

    def __init__(self, *, max_respawns: int, store_timeout_s: float, joining: bool = False) -> None:
        self.max_respawns = max_respawns
        """Starts after which the keeper gives up (``membership.max_respawns``)."""
        self.store_timeout_s = store_timeout_s
        """The rendezvous store's timeout (``comm.timeout_s``)."""
        self._signal: int | None = None
        self._child: Any = None
        self._store: Any = None
        self.joining = joining
        """This launch joins a run from another node: it has no server, and rank 0 is a member."""

    def start_child(self, starts: int) -> tuple[Any, Any]:
        """Start the ``starts``-th child: (the child, the flag it sets once it serves or joined)."""
        raise NotImplementedError

    def child_slot(self) -> int:
        """The slot the current child holds (0: none yet); here, this rank's."""
        return int(os.environ.get("RANK", "0"))

    def _forward(self, signum: int, frame: object) -> None:
        self._signal = signum
        if self._child is not None and self._child.is_alive():
            os.kill(self._child.pid, signum)  # the child ends the run cleanly on it

    def run(self) -> int:
        """Run children until one ends cleanly (or the respawn budget is spent); its exit code."""
        from easgd.topologies.registry import setup_logging

        setup_logging(f"keeper{os.environ.get('RANK', '0')}")
        previous = {s: signal.signal(s, self._forward) for s in (signal.SIGINT, signal.SIGTERM)}
        starts, code = 0, 0
        try:
            while True:
                starts += 1
                self._child, started = self.start_child(starts)
                self._wait()
                code = self._child.exitcode
                if code == 0 or self._signal is not None:
                    return int(code or 0)
                if code is not None and code > 0 and not started.is_set():
                    log.error("the child failed before it started (exit code %d); not again", code)
                    self._give_up()
                    return int(code)
                if code is not None and code > 0 and self._run_is_over():
                    log.error(
                        "the child failed (exit code %d) and the run is over; not again", code
                    )
                    return int(code)
                if starts > self.max_respawns:
                    log.error("the child ended with %s %d times; giving up", _how(code), starts)
                    self._give_up()
                    return int(code) if code and code > 0 else 1
                log.warning("the child ended with %s; starting a new one", _how(code))
                time.sleep(RESPAWN_PAUSE_S)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _run_store(self) -> Any:
        """The run's store (opened once): this launch's."""
        if self._store is None:
            from easgd.comm.groups import DistEnv, open_store

            self._store = open_store(DistEnv.from_environ(), timeout_s=self.store_timeout_s)[0]
        return self._store

    def _give_up(self) -> None:
        """The server's keeper giving up ends the run for the members too (else they would wait
        for a server that is not coming, and their keepers would start new ones)."""
        from easgd.comm.membership import mark_run_over

        if int(os.environ.get("RANK", "0")) == 0 and not self.joining:
            mark_run_over(self._run_store())

    def _run_is_over(self) -> bool:
        """Whether the run has ended (a server that failed on its own error ends it on the way
        out: a new one would only wait for members that have left)."""
        from easgd.comm.membership import run_over

        return run_over(self._run_store())

    def _wait(self) -> None:
        """Wait for the child; kill it if the server asks (it declared the child hung)."""
        from easgd.comm.membership import eviction_requested

        server = int(os.environ.get("RANK", "0")) == 0 and not self.joining
        while self._child.is_alive():
            self._child.join(timeout=EVICT_CHECK_S)
            slot = self.child_slot()
            if server or slot == 0 or not self._child.is_alive():
                continue
            if eviction_requested(self._run_store(), slot):
                log.warning("the server declared this slot's worker hung; killing it")
                self._child.kill()


class Keeper(ChildKeeper):
    """Keeps one child running this rank's part of an easgd.train run (:func:`_member_entry`)."""

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(
            max_respawns=cfg.membership.max_respawns,
            store_timeout_s=cfg.comm.timeout_s,
            joining=cfg.membership.join is not None,
        )
        self.cfg = cfg
        self._slot: Any = None

    def start_child(self, starts: int) -> tuple[Any, Any]:
        """A spawned process running :func:`_member_entry`, and its started event."""
        context = multiprocessing.get_context("spawn")
        started, self._slot = context.Event(), context.Value("i", 0)
        child = context.Process(
            target=_member_entry,
            args=(to_dict(self.cfg), starts, started, self._slot, os.getpid()),
            daemon=False,
        )
        child.start()
        return child, started

    def child_slot(self) -> int:
        """The slot the child reported (a joining node's members learn theirs when they join)."""
        return int(self._slot.value) if self._slot is not None else 0

    def _run_store(self) -> Any:
        """The run's store (opened once): this launch's, or the joined run's."""
        if self._store is None:
            from easgd.comm.groups import DistEnv
            from easgd.topologies.elastic import open_run_store

            self._store = open_run_store(self.cfg, DistEnv.from_environ())[0]
        return self._store


def _how(code: int | None) -> str:
    if code is not None and code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"exit code {code}"


def keep(cfg: TrainConfig) -> dict[str, Any] | None:
    """This rank's part of an elastic run, kept filled; rank 0 returns the run's summary."""
    import json
    from pathlib import Path

    from easgd.comm.groups import DistEnv, check_world

    if cfg.membership.join is None:  # a joining launch fills the run's open slots, as many as come
        expected = cfg.world_size - cfg.membership.open_slots
        check_world(DistEnv.from_environ(), expected_world_size=expected, workers=cfg.workers)
    code = Keeper(cfg).run()
    if code != 0:
        raise SystemExit(code)
    if int(os.environ.get("RANK", "0")) != 0 or cfg.membership.join is not None:
        return None
    summary = Path(cfg.run_dir) / "summary.json"
    return json.loads(summary.read_text()) if summary.exists() else None
