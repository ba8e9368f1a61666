"""One process of a run: pick the topology's main from the registry below and run it.

A topology is one way of laying out a run's ranks and exchanges (the parameter server, a sharded
center, all-reduce, a sequential baseline). Each has a main in its own module taking the
validated config; the shared parts (data, model, run log, stop rules, faults, summary) come from
:mod:`easgd.parts.assembly`. Adding a topology means writing its module and one line in
:data:`TOPOLOGY_MAINS`. (``mode=simulate`` runs in the launching process: :mod:`.simulate`.)
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from typing import Any

from easgd.comm.groups import SERVER_RANK
from easgd.config.schema import TrainConfig, membership_mode
from easgd.parts import interrupt

TOPOLOGY_MAINS = {
    "server": "easgd.topologies.server:run_server_topology",
    "sharded": "easgd.topologies.sharded:run_sharded",
    "allreduce": "easgd.topologies.allreduce:run_allreduce",
    "sequential": "easgd.topologies.sequential:run_sequential",
}
"""Topology name -> ``module:function`` of its process main (imported only when it runs)."""

INTERRUPTIBLE = frozenset({"server", "sharded"})
"""Topologies whose processes end cleanly on SIGINT/SIGTERM (:mod:`easgd.parts.interrupt`): a
final snapshot and an ``interrupted`` summary, resumable with ``resume=``. The others keep
Python's default (KeyboardInterrupt; the launcher's deadline)."""


def topology_of(cfg: TrainConfig) -> str:
    """Which topology runs ``cfg``: sequential (p = 1 baselines), allreduce, sharded or server."""
    if not cfg.algorithm.uses_server:
        return "sequential"
    if cfg.topology == "allreduce":
        return "allreduce"
    return "sharded" if cfg.server.shards > 1 else "server"


def setup_logging(name: str) -> None:
    """Log lines prefixed by the process's role (``server``, ``worker3``, ``rank1`` ...)."""
    logging.basicConfig(
        level=os.environ.get("EASGD_LOG_LEVEL", "INFO"),
        format=f"[{name}] %(levelname)s %(message)s",
        force=True,
    )


def role_name(rank: int) -> str:
    """The log prefix of ``rank`` in the server topology."""
    return "server" if rank == SERVER_RANK else f"worker{rank}"


def run_process(cfg: TrainConfig) -> dict[str, Any] | None:
    """Run this process's part; the process that owns the run's record returns the summary."""
    topology = topology_of(cfg)
    if membership_mode(cfg) == "elastic":
        from easgd.topologies.keeper import keep

        return keep(cfg)
    module, _, function = TOPOLOGY_MAINS[topology].partition(":")
    main = getattr(importlib.import_module(module), function)
    catch = topology in INTERRUPTIBLE and threading.current_thread() is threading.main_thread()
    if catch:
        interrupt.install()
    try:
        result: dict[str, Any] | None = main(cfg)
    finally:
        if catch:
            interrupt.uninstall()
    return result
