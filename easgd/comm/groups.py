"""Process-group set-up: checks that fail fast with a clear message, and one group per pair.

Rank 0 is the parameter server; ranks 1..p are workers. Under torchrun's shared store (the
default: the agent's rendezvous store outlives the workers) every restart of the job gets a
fresh key prefix, so gloo re-initialisation does not trip over the keys of the attempt before
(measured: "Gloo connectFullMesh failed ... Connection refused" otherwise). The prefix is the
c10d rendezvous round, which every agent of the job agrees on, including an agent on a
replacement node that starts from scratch (its own restart count is 0 while the others' is
not); with another rendezvous backend it is the agent's restart count. Without the shared store
(``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, which node replacement under torch 2.13 needs: see
docs/reliability.md) rank 0 hosts a new store at every start, so the prefix is constant.
"""

from __future__ import annotations

import base64
import datetime
import logging
import os
import pickle
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

SERVER_RANK = 0

log = logging.getLogger("easgd")


class LaunchError(RuntimeError):
    """The processes were started in a way that cannot work; the message says how to fix it."""


@dataclass(frozen=True)
class DistEnv:
    """What torchrun (or the self-launcher) put into this process's environment."""

    rank: int
    world_size: int
    local_rank: int
    restart_count: int

    @classmethod
    def from_environ(cls) -> DistEnv:
        """Read RANK, WORLD_SIZE, LOCAL_RANK and TORCHELASTIC_RESTART_COUNT."""
        return cls(
            rank=int(os.environ.get("RANK", "0")),
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            restart_count=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
        )


def under_launcher() -> bool:
    """True inside a process started by torchrun / elastic launch."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def check_world(env: DistEnv, *, expected_world_size: int, workers: int) -> None:
    """Fail with a fix-it message when the launch does not match the configured workers."""
    if env.world_size != expected_world_size:
        if expected_world_size == 1:
            fix = "sequential baselines run in one process: use --nproc_per_node=1"
        else:
            fix = (
                f"workers={workers} needs {expected_world_size} processes (the server is rank 0): "
                f"use torchrun --nproc_per_node={expected_world_size}, or set workers={env.world_size - 1}"
            )
        raise LaunchError(
            f"world size is {env.world_size} but the config expects {expected_world_size}; {fix}"
        )


def choose_backend(requested: str) -> str:
    """The backend to use; NCCL without CUDA is rejected here, before any connection is made."""
    if requested == "nccl" and not torch.cuda.is_available():
        raise LaunchError(
            "comm.backend=nccl needs CUDA GPUs, and this machine has none; use comm.backend=gloo"
        )
    if requested == "nccl" and not dist.is_nccl_available():
        raise LaunchError("this torch build has no NCCL; use comm.backend=gloo")
    return "gloo" if requested == "auto" else requested


def rendezvous_round(store: dist.Store, run_id: str | None = None) -> int | None:
    """The round of torchrun's c10d rendezvous ``run_id`` (default: this process's) kept in
    ``store`` (None: not c10d).

    The c10d rendezvous keeps its state (pickled, base64) under ``torch.rendezvous.<run id>`` in
    its TCP store; its round increases at every re-rendezvous.
    """
    run_id = run_id if run_id is not None else os.environ.get("TORCHELASTIC_RUN_ID")
    key = f"torch.rendezvous.{run_id}"
    try:
        if not run_id or not store.check([key]):
            return None
        raw = store.get(key)
        state = pickle.loads(base64.b64decode(raw))  # written by torch's own rendezvous
        return int(state.round)
    except Exception as err:  # another rendezvous backend, or a format this torch does not use
        log.debug("no c10d rendezvous round in the store (%s)", err)
        return None


def _store(env: DistEnv, timeout: datetime.timedelta) -> tuple[dist.Store, int]:
    """A TCP store client on torchrun's store (or rank 0's own), and the job's generation."""
    host = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = int(os.environ.get("MASTER_PORT", "29500"))
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(
        host,
        port,
        env.world_size,
        is_master=(env.rank == 0 and not agent_store),
        timeout=timeout,
        wait_for_workers=False,
    )
    if not agent_store:
        # rank 0 hosts this store and it is new at every start: no keys of an earlier attempt,
        # and a prefix that differed between nodes (a replaced node's restart count is 0) would
        # split the job. The generation (fault.* fires in 0 only) is this process's own count.
        return dist.PrefixStore("easgd/", store), env.restart_count
    round_ = rendezvous_round(store)
    generation = env.restart_count if round_ is None else round_
    prefix = f"easgd/attempt{generation}/" if round_ is None else f"easgd/round{round_}/"
    if env.rank == 0:  # for launches that join this run from other nodes (membership.join)
        store.set(LIVE_PREFIX_KEY, prefix)
    return dist.PrefixStore(prefix, store), generation


LIVE_PREFIX_KEY = "easgd/live"
"""Key (unprefixed) of the shared store naming the prefix of the run's newest start."""


def open_joined_store(address: str, run_id: str, *, timeout_s: float) -> dist.Store:
    """The (prefixed) store of the run whose torchrun rendezvous endpoint is ``address``
    (HOST:PORT, c10d backend, ``--rdzv-id`` ``run_id``), for a launch that joins it from another
    node (``membership.join``). The endpoint's store names the run's shared store (torchrun's
    MASTER_ADDR/MASTER_PORT of the current round), which names the run's key prefix. Waits up to
    ``timeout_s`` for the run to be up."""
    host, _, port = address.rpartition(":")
    timeout = datetime.timedelta(seconds=timeout_s)
    deadline = time.monotonic() + timeout_s
    try:
        rendezvous = dist.TCPStore(
            host, int(port), is_master=False, timeout=timeout, wait_for_workers=False
        )
        while (round_ := rendezvous_round(rendezvous, run_id)) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no rendezvous {run_id!r} there")
            time.sleep(0.2)
        info = dist.PrefixStore(f"torch.rendezvous.{run_id}.{round_}", rendezvous)
        info.wait(["MASTER_ADDR", "MASTER_PORT"], timeout)
        shared = dist.TCPStore(
            info.get("MASTER_ADDR").decode(),
            int(info.get("MASTER_PORT").decode()),
            is_master=False,
            timeout=timeout,
            wait_for_workers=False,
        )
        shared.wait([LIVE_PREFIX_KEY], timeout)
    except Exception as err:
        raise LaunchError(
            f"membership.join={address}: no easgd run with rendezvous id {run_id!r} found there "
            f"within {timeout_s:g} s ({err}); start the first node (the server) with torchrun "
            f"--rdzv-backend=c10d --rdzv-endpoint={address} --rdzv-id={run_id}, set "
            "membership.join_id to its --rdzv-id, and check that this node can reach it"
        ) from err
    return dist.PrefixStore(shared.get(LIVE_PREFIX_KEY).decode(), shared)


def open_store(env: DistEnv, *, timeout_s: float) -> tuple[dist.Store, int]:
    """The run's rendezvous store (generation-prefixed) and the job's generation, without
    joining any process group (workers that come and go make their own: membership.py)."""
    return _store(env, datetime.timedelta(seconds=timeout_s))


@dataclass
class PairGroups:
    """The process groups of this rank and the store they were made with."""

    groups: dict[int, dist.ProcessGroup]
    """``{worker_rank: group}`` on the server, ``{own_rank: group}`` on a worker."""
    store: dist.Store
    """The (generation-prefixed) rendezvous store, also used for heartbeats."""
    generation: int = 0
    """Which start of the job this is, as every rank agrees (0: the first; fault.* fires only there)."""
    direct: bool = False
    """The groups are members' own 2-rank groups (server 0, member 1), used directly."""


def init_pair_groups(env: DistEnv, *, backend: str, timeout_s: float) -> PairGroups:
    """Join the default group and create one group per (server, worker) pair."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store, generation = _store(env, timeout)
    dist.init_process_group(
        backend,
        store=store,
        rank=env.rank,
        world_size=env.world_size,
        timeout=timeout,
    )
    groups: dict[int, dist.ProcessGroup] = {}
    for worker in range(1, env.world_size):
        # Every rank calls every new_group, in the same order (the c10d contract), but only the
        # pair's two ranks touch the store: without TORCH_DIST_INIT_BARRIER=1 a non-member returns
        # at once, so set-up costs O(p) store operations. (use_local_synchronization would let
        # non-members skip the call, but its hashed group names count the groups each process
        # already has, so the server and worker w disagree on the name for w > 1 and hang.)
        group = dist.new_group([SERVER_RANK, worker], timeout=timeout)
        if env.rank in (SERVER_RANK, worker):
            groups[worker] = group
    return PairGroups(groups, store, generation)


def shutdown() -> None:
    """Leave the process group if one was joined."""
    if dist.is_initialized():
        dist.destroy_process_group()
