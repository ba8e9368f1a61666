"""Transport to a center held by k shard ranks (``server.shards=k``): ranks 0..k-1 serve slices.

A worker's :class:`ShardedTransport` presents the :class:`PairTransport` interface: it cuts each
payload into k contiguous slices, sends slice j to shard j and receives the k replies in parallel
(one thread per shard, each on its own pair group), then joins the replies into one payload and
one header (stop if any shard says stop, the largest error code). Each shard rank runs the
unchanged parameter server over its slice. Shard 0 evaluates the whole center by pulling the
other slices over its own pair groups (:class:`SliceGather`, :func:`serve_slices`).

Rank layout: shards are ranks 0..k-1, workers are ranks k..k+p-1.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from easgd.comm.groups import DistEnv, _store
from easgd.comm.message import Header, Op
from easgd.comm.transport import PairTransport


@dataclass
class ShardGroups:
    """This rank's pair groups and the (attempt-prefixed) rendezvous store."""

    workers: dict[int, dist.ProcessGroup]
    """On a shard: ``{worker_rank: group}``; empty on a worker."""
    shards: dict[int, dist.ProcessGroup]
    """On a worker: ``{shard_rank: group}``; on shard 0: ``{shard j > 0: group}`` for the
    evaluation pulls; on shard j > 0: ``{0: group}``."""
    store: dist.Store
    generation: int = 0
    """Which start of the job this is, as every rank agrees (as :class:`PairGroups`)."""


def init_shard_groups(env: DistEnv, *, shards: int, backend: str, timeout_s: float) -> ShardGroups:
    """Join the default group; create one group per (shard, worker) pair and per (0, shard j)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store, generation = _store(env, timeout)
    dist.init_process_group(
        backend, store=store, rank=env.rank, world_size=env.world_size, timeout=timeout
    )
    workers: dict[int, dist.ProcessGroup] = {}
    peers: dict[int, dist.ProcessGroup] = {}
    # every rank takes part in every new_group call, in the same order (the c10d contract)
    for shard in range(shards):
        for worker in range(shards, env.world_size):
            group = dist.new_group([shard, worker], timeout=timeout)
            if env.rank == shard:
                workers[worker] = group
            elif env.rank == worker:
                peers[shard] = group
    for shard in range(1, shards):
        group = dist.new_group([0, shard], timeout=timeout)
        if env.rank == 0:
            peers[shard] = group
        elif env.rank == shard:
            peers[0] = group
    return ShardGroups(workers, peers, store, generation)


class ShardedTransport:
    """A worker's transport to k shards, with :class:`PairTransport`'s interface."""

    def __init__(self, transports: list[PairTransport], bounds: list[tuple[int, int]]) -> None:
        if len(transports) != len(bounds):
            raise ValueError(f"{len(transports)} transports for {len(bounds)} slices")
        self.transports = transports
        self.bounds = bounds
        self.numel = bounds[-1][1]
        self._pool = ThreadPoolExecutor(max_workers=len(transports), thread_name_prefix="shard")

    def _parts(self, payload: Tensor | None) -> list[Tensor | None]:
        if payload is None:
            return [None] * len(self.bounds)
        flat = payload.reshape(-1)
        if flat.numel() != self.numel:
            raise ValueError(f"payload has {flat.numel()} values, expected {self.numel}")
        if not math.isfinite(float(flat.sum())):
            # the unsharded server refuses a whole update with a non-finite value anywhere:
            # poison every slice, so that every shard refuses it and replies its center slice
            return [torch.full((hi - lo,), math.nan, dtype=flat.dtype) for lo, hi in self.bounds]
        return [flat[lo:hi] for lo, hi in self.bounds]

    def _headers(self, header: Header) -> list[Header]:
        if header.op != Op.HELLO:
            return [header] * len(self.bounds)
        # a shard checks the parameter count of its own slice
        return [dataclasses.replace(header, num_params=hi - lo) for lo, hi in self.bounds]

    def _each(self, call: Callable[[int], object]) -> list[object]:
        return list(self._pool.map(call, range(len(self.transports))))

    def send(self, header: Header, payload: Tensor | None = None) -> None:
        """Send slice j of ``payload`` to shard j, all shards at once."""
        headers, parts = self._headers(header), self._parts(payload)
        self._each(lambda j: self.transports[j].send(dataclasses.replace(headers[j]), parts[j]))

    def send_control(self, header: Header, payload: Tensor | None = None) -> None:
        """:meth:`PairTransport.send_control` to every shard, each with its slice."""
        headers, parts = self._headers(header), self._parts(payload)
        self._each(
            lambda j: self.transports[j].send_control(dataclasses.replace(headers[j]), parts[j])
        )

    def recv(self) -> tuple[Header, Tensor | None]:
        """Receive every shard's reply and join them (a new tensor)."""
        return self._join(self._each(lambda j: self.transports[j].recv()))

    def recv_control(self) -> tuple[Header, Tensor | None]:
        """:meth:`PairTransport.recv_control` from every shard, joined."""
        return self._join(self._each(lambda j: self.transports[j].recv_control()))

    def _join(self, replies: list[object]) -> tuple[Header, Tensor | None]:
        pairs = [r for r in replies if isinstance(r, tuple)]
        headers: list[Header] = [h for h, _ in pairs]
        payloads: list[Tensor | None] = [p for _, p in pairs]
        header = dataclasses.replace(
            headers[0],
            stop=any(h.stop for h in headers),
            error=max(h.error for h in headers),
            staleness=max(h.staleness for h in headers),
            num_params=sum(h.num_params for h in headers),
        )
        if any(p is None for p in payloads):
            return header, None
        return header, torch.cat([p for p in payloads if p is not None])


# -- shard 0's view of the whole center, for evaluation --------------------------------------
NOW, FINAL = 1.0, 2.0
"""Requests of shard 0 to shard j: its current slice, or its final slice (then it stops serving)."""


class SliceGather:
    """Shard 0: the whole evaluated vector, its own slice joined with slices pulled from shards j > 0.

    ``final()`` tells whether this is the end-of-run evaluation: then each shard j answers only
    once its own server has finished, so the slices are the final ones, and stops serving.
    """

    def __init__(
        self,
        peers: dict[int, dist.ProcessGroup],
        bounds: list[tuple[int, int]],
        final: Callable[[], bool],
    ) -> None:
        self.peers = peers
        self.bounds = bounds
        self.final = final
        self._final_slices: list[Tensor] | None = None

    def __call__(self, own: Tensor) -> Tensor:
        if self._final_slices is not None:
            return torch.cat([own, *self._final_slices])
        return torch.cat([own, *self._pull(FINAL if self.final() else NOW, own.dtype)])

    def _pull(self, request: float, dtype: torch.dtype) -> list[Tensor]:
        slices = []
        for shard in sorted(self.peers):
            lo, hi = self.bounds[shard]
            dist.send(torch.tensor([request]), shard, group=self.peers[shard])
            part = torch.empty(hi - lo, dtype=dtype)
            dist.recv(part, shard, group=self.peers[shard])
            slices.append(part)
        if request == FINAL:
            self._final_slices = slices
        return slices

    def release(self, dtype: torch.dtype) -> None:
        """Stop every shard's slice service (if the final evaluation never asked for it)."""
        if self._final_slices is None:
            self._pull(FINAL, dtype)


def serve_slices(
    group: dist.ProcessGroup,
    snapshot: Callable[[], Tensor],
    server_done: threading.Event,
) -> threading.Thread:
    """Shard j > 0: answer shard 0's slice requests from a daemon thread until the final one."""

    def loop() -> None:
        request = torch.zeros(1)
        while True:
            dist.recv(request, 0, group=group)
            final = request.item() == FINAL
            if final:
                server_done.wait()
            dist.send(snapshot().contiguous(), 0, group=group)
            if final:
                return

    thread = threading.Thread(target=loop, name="serve-slices", daemon=True)
    thread.start()
    return thread
