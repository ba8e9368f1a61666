"""Joining a run from a user's own script: process groups, the rendezvous store, and the checks.

Rank 0 serves the center (:func:`easgd.api.serve`); ranks 1..p train with
:class:`easgd.api.ElasticOptimizer`. Each (server, worker) pair gets its own process group, as in
``easgd.train``; the store carries heartbeats and the server's run description to the workers
(its algorithm and model size, and where the run's snapshots go and which one it resumed from).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch.distributed as dist

from easgd.comm.groups import SERVER_RANK, DistEnv, LaunchError, init_pair_groups, shutdown

BACKENDS = ("auto", "gloo")

RUN_KEY = "api/run"
"""Store key under which the server publishes the run description for its workers."""


@dataclass
class Session:
    """This process's place in the run, its pair process groups and the rendezvous store."""

    env: DistEnv
    groups: dict[int, dist.ProcessGroup]
    store: dist.Store | None = None
    timeout_s: float = 120.0

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


def join(*, backend: str = "auto", timeout_s: float = 120.0) -> Session:
    """Join the run started by torchrun (rank 0 = server, ranks 1..p = workers).

    ``backend`` must be ``auto`` or ``gloo`` (checked before any connection is made);
    ``timeout_s`` bounds the rendezvous and every blocking receive.
    """
    name = check_backend(backend)
    env = DistEnv.from_environ()
    if env.world_size < 2:
        raise LaunchError(
            "easgd.api needs a server and at least one worker: torchrun --nproc_per_node>=2"
        )
    pairs = init_pair_groups(env, backend=name, timeout_s=timeout_s)
    return Session(env, pairs.groups, pairs.store, timeout_s)
