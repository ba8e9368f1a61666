"""Joining a run from a user's own script: process groups, the rendezvous store, and the checks.

Rank 0 serves the center (:func:`easgd.api.serve`); ranks 1..p train with
:class:`easgd.api.ElasticOptimizer`. Each (server, worker) pair gets its own process group, as in
``easgd.train``; the store carries heartbeats and the server's run description to the workers
(its algorithm and model size, and where the run's snapshots go and which one it resumed from).

With ``membership="elastic"`` (under :func:`easgd.api.keeper`) no process joins a default group:
each worker claims a slot and opens its own 2-rank group with the server when it joins
(:mod:`easgd.api.members`), so workers can come and go.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch.distributed as dist

from easgd.api.keeper import kept_start
from easgd.comm.groups import (
    SERVER_RANK,
    DistEnv,
    LaunchError,
    init_pair_groups,
    open_store,
    shutdown,
)

BACKENDS = ("auto", "gloo")
MEMBERSHIP = ("auto", "fixed", "elastic")

RUN_KEY = "api/run"
"""Store key under which the server publishes the run description for its workers."""


@dataclass
class Session:
    """This process's place in the run, its pair process groups and the rendezvous store."""

    env: DistEnv
    groups: dict[int, dist.ProcessGroup]
    store: dist.Store | None = None
    timeout_s: float = 120.0
    membership: str = "fixed"
    """``fixed`` (every rank in one job-long roster) or ``elastic`` (workers come and go)."""

    @property
    def is_server(self) -> bool:
        """True on rank 0, which holds the center."""
        return self.env.rank == SERVER_RANK

    @property
    def num_workers(self) -> int:
        """p = world size - 1."""
        return self.env.world_size - 1

    @property
    def restart_count(self) -> int:
        """How many times torchrun restarted this run (0 on the first attempt)."""
        return self.env.restart_count

    def publish_run(self, info: dict[str, object]) -> None:
        """Server: describe the run to the workers (algorithm, model, snapshots; :meth:`read_run`)."""
        if self.store is not None:
            self.store.set(RUN_KEY, json.dumps(info))

    def read_run(self) -> dict[str, object]:
        """Worker: the server's run description (waits for it; {} without a store)."""
        if self.store is None:
            return {}
        return dict(json.loads(self.store.get(RUN_KEY)))

    def close(self) -> None:
        """Leave the process groups."""
        shutdown()


def check_backend(backend: str) -> str:
    """The process-group backend for ``backend``, or a ValueError naming the fix."""
    if backend == "nccl":
        raise ValueError(
            "api.join(backend='nccl'): easgd's transport sends CPU tensors point to point, which "
            "NCCL cannot carry; use backend='gloo' (the default 'auto'). Models on GPUs work with "
            "it: parameters are staged through pinned CPU buffers."
        )
    if backend not in BACKENDS:
        raise ValueError(f"api.join(backend={backend!r}); allowed: {', '.join(BACKENDS)}")
    return "gloo"


def check_membership(membership: str) -> str:
    """The membership ``membership`` resolves to here, or an error naming the fix.

    ``auto`` is ``elastic`` in a script kept by :func:`easgd.api.keeper` (under torchrun with its
    shared store) and ``fixed`` otherwise; ``elastic`` needs the keeper, and ``fixed`` refuses
    it (a respawned worker cannot rejoin a fixed roster)."""
    if membership not in MEMBERSHIP:
        raise ValueError(f"api.join(membership={membership!r}); allowed: {', '.join(MEMBERSHIP)}")
    kept = kept_start() > 0
    if membership == "auto":
        return "elastic" if kept else "fixed"
    if membership == "elastic" and not kept:
        raise LaunchError(
            "api.join(membership='elastic') needs api.keep() as the script's first call, under "
            "torchrun with its shared store (the default; not TORCH_DISABLE_SHARE_RDZV_TCP_STORE)"
            ": it starts a new worker process when one dies"
        )
    if membership == "fixed" and kept:
        raise LaunchError(
            "api.join(membership='fixed') under api.keep(): a worker the keeper starts again "
            "cannot rejoin a fixed roster; use membership='elastic' (or 'auto'), or drop api.keep()"
        )
    return membership


def join(*, backend: str = "auto", timeout_s: float = 120.0, membership: str = "auto") -> Session:
    """Join the run started by torchrun (rank 0 = server, ranks 1..p = workers).

    ``backend`` must be ``auto`` or ``gloo`` and ``membership`` one of ``auto``, ``fixed``,
    ``elastic`` (:func:`check_membership`; both checked before any connection is made);
    ``timeout_s`` bounds the rendezvous and every blocking receive.
    """
    name = check_backend(backend)
    mode = check_membership(membership)
    env = DistEnv.from_environ()
    if env.world_size < 2:
        raise LaunchError(
            "easgd.api needs a server and at least one worker: torchrun --nproc_per_node>=2"
        )
    if mode == "elastic":  # no default group: each worker's own group, made when it joins
        store, _ = open_store(env, timeout_s=timeout_s)
        return Session(env, {}, store, timeout_s, membership=mode)
    pairs = init_pair_groups(env, backend=name, timeout_s=timeout_s)
    return Session(env, pairs.groups, pairs.store, timeout_s)
