"""The replicated-center topology's transport: one all-reduce over the p workers per exchange.

It only moves and adds tensors (it knows no moving rate). A few control slots ride in the same
buffer as the elastic differences, so a checkpoint or stop decision of rank 0 and every rank's
train loss reach all ranks without a second message. The backend follows the device: gloo for CPU
workers, NCCL when every worker has its own GPU (written for that case, not run here: CI and the
development machine have no GPU).
"""

from __future__ import annotations

import datetime
import random
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from easgd.comm.groups import DistEnv, _store
from easgd.comm.transport import Delay


def allreduce_backend(device: torch.device) -> str:
    """NCCL for CUDA workers (each rank on its own GPU), gloo for CPU workers."""
    if device.type == "cuda":
        if not dist.is_nccl_available():
            raise RuntimeError(
                "this torch build has no NCCL; run topology=allreduce with device=cpu"
            )
        return "nccl"
    return "gloo"


def init_world(env: DistEnv, *, backend: str, timeout_s: float) -> tuple[dist.Store, int]:
    """Join the default group of all ranks (every rank a worker); return the rendezvous store
    and the job's generation (which start this is, as every rank agrees: see ``PairGroups``).

    The store is prefixed like the server topology's groups.
    """
    timeout = datetime.timedelta(seconds=timeout_s)
    store, generation = _store(env, timeout)
    dist.init_process_group(
        backend, store=store, rank=env.rank, world_size=env.world_size, timeout=timeout
    )
    return store, generation


class AllReduceSum:
    """Sums ``numel`` values plus ``control_slots`` control values over ``group`` (default: all ranks).

    The sums live in a buffer that the next call reuses: consume (or copy) them first. Injected
    delay (``comm.latency_ms`` / ``jitter_ms``) is applied before each all-reduce, as the server
    topology applies it before each message.
    """

    def __init__(
        self,
        *,
        numel: int,
        control_slots: int,
        group: dist.ProcessGroup | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        delay: Delay | None = None,
        seed: int = 0,
    ) -> None:
        self.numel = numel
        self.group = group
        self.delay = delay or Delay()
        self._rng = random.Random(seed)
        self._buffer = torch.zeros(numel + control_slots, dtype=dtype, device=device)

    def __call__(self, values: Tensor, control: Tensor) -> tuple[Tensor, Tensor]:
        """(sum over ranks of ``values``, sum over ranks of ``control``); neither input is modified."""
        if values.numel() != self.numel:
            raise ValueError(f"payload has {values.numel()} values, expected {self.numel}")
        pause = self.delay.sample_s(self._rng)
        if pause > 0:
            time.sleep(pause)
        self._buffer[: self.numel].copy_(values.reshape(-1))
        self._buffer[self.numel :].copy_(control)
        try:
            dist.all_reduce(self._buffer, op=dist.ReduceOp.SUM, group=self.group)
        except RuntimeError as err:  # gloo: a peer's connection closed, or comm.timeout_s passed
            raise RuntimeError(
                "the all-reduce failed: a rank died, or hung for comm.timeout_s (every rank waits "
                f"for every other at each exchange): {err}"
            ) from err
        return self._buffer[: self.numel], self._buffer[self.numel :].to("cpu", torch.float64)


def all_ranks_min(value: int, *, device: torch.device | str = "cpu") -> int:
    """The minimum of ``value`` over all ranks (a collective: every rank calls it)."""
    return _all_ranks(value, dist.ReduceOp.MIN, device)


def all_ranks_max(value: int, *, device: torch.device | str = "cpu") -> int:
    """The maximum of ``value`` over all ranks (a collective: every rank calls it)."""
    return _all_ranks(value, dist.ReduceOp.MAX, device)


def _all_ranks(value: int, op: Any, device: torch.device | str) -> int:
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=op)
    return int(tensor.item())
