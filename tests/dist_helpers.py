"""Helpers for multi-process tests: spawn a real gloo world on free local ports, collect results.

Targets run in spawned processes, so they live here at module level (importable by the child).
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import socket
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _entry(
    target: Callable[..., Any], rank: int, world: int, port: int, args: tuple, queue: Any
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world)
    )
    torch.set_num_threads(1)
    try:
        # as bytes: a tensor put on the queue as is travels as a shared-memory handle that the
        # parent must fetch from this process, which may have exited by then (a rare, load-
        # dependent "Connection reset by peer" in the parent)
        buffer = io.BytesIO()
        torch.save(target(rank, world, *args), buffer)
        queue.put((rank, "ok", buffer.getvalue()))
    except BaseException as err:  # reported to the test, which fails with the traceback
        queue.put((rank, "error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def spawn_world(
    target: Callable[..., Any],
    world: int,
    *args: Any,
    timeout: float = 60.0,
    dead: int | None = None,
) -> dict[int, Any]:
    """Run ``target(rank, world, *args)`` in ``world`` spawned processes; return {rank: result}.

    ``dead``: a rank expected to exit without a result (it kills itself in a crash test); the
    others' results are collected. Raises AssertionError with the child's traceback if any rank
    failed or timed out.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(target, r, world, port, args, queue)) for r in range(world)
    ]
    for proc in procs:
        proc.start()
    results: dict[int, Any] = {}
    errors = []
    try:
        for _ in range(world if dead is None else world - 1):
            rank, status, value = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = torch.load(io.BytesIO(value), weights_only=False)
            else:
                errors.append(f"rank {rank}: {value}")
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    assert not errors, "\n".join(errors)
    return results


def own_ledgers_match(directory: Path) -> int:
    """Elastic membership: each finished member's own ledger equals the one the server kept for
    it (bit for bit); returns how many were compared."""
    compared = 0
    for own in directory.glob("own-ledger-slot*.pt"):
        server_side = directory / own.name.removeprefix("own-")
        assert torch.equal(torch.load(own), torch.load(server_side)), own.name
        compared += 1
    return compared
