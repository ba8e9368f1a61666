"""What communication costs on the simulator's virtual clock, and where the numbers come from.

One exchange of a worker with the server is charged like this (``tau`` local steps apart)::

    sent ──(latency + bytes / bandwidth)──> arrives ──(waits while the server is busy)──> served
         ──(service time)──> done ──(latency + bytes / bandwidth)──> reply reaches the worker

The server serves one exchange at a time, in arrival order (:class:`ServerQueue`), so queueing
appears when many workers come at once. A blocking worker waits for its reply before its next
gradient step; an overlapping worker (``comm.overlap``) keeps stepping.

Virtual time is counted in steps: one gradient step of a speed-1 worker is one unit, as in the
simulator without costs. A :class:`ExchangeCost` holds the charges in those units; a cost profile
(:class:`easgd.config.schema.CostConfig`, YAML files in ``configs/cost/``) holds them in seconds
and bits per second, and :func:`exchange_cost` divides by the model's step time. The ``measured``
profile times one local step of the model and one real gloo exchange of its size on this machine
(:func:`measure_gloo_exchange`; every measurement is cached by :func:`cached`); the cluster
profiles write their network numbers down with sources (``configs/cost/*.yaml``).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from easgd.comm.compression import payload_bytes

FLOAT_BYTES = 4
"""Messages carry float32 parameters."""

HEADER_BYTES = 64
"""The message header (8 float64 slots, easgd.comm.message.HEADER_SIZE)."""


@dataclass(frozen=True)
class ExchangeCost:
    """Charges of one exchange in virtual time units (one step of a speed-1 worker = 1).

    All zero is the free exchange of the simulator without costs.
    """

    latency: float = 0.0
    """One message's latency, each direction."""
    transfer: float = 0.0
    """One message's bytes / bandwidth, each direction (request and reply have the same size)."""
    service: float = 0.0
    """The server's time to handle one exchange (the update rule on the center)."""

    def __post_init__(self) -> None:
        for name in ("latency", "transfer", "service"):
            value = getattr(self, name)
            if not value >= 0 or value == float("inf"):
                raise ValueError(f"ExchangeCost.{name} must be finite and >= 0, got {value!r}")

    @property
    def one_way(self) -> float:
        """Time for one message to reach the other side."""
        return self.latency + self.transfer

    @property
    def round_trip(self) -> float:
        """Send, service and reply with no queueing."""
        return 2 * self.one_way + self.service


def ring_allreduce_time(cost: ExchangeCost, num_workers: int) -> float:
    """Virtual time of one synchronous all-reduce round of the model among ``num_workers`` ranks.

    A ring all-reduce (reduce-scatter, then all-gather) sends 2 (p - 1) messages in sequence,
    each 1/p of the model (Thakur, Rabenseifner, Gropp 2005)::

        round = 2 (p - 1) * latency + 2 (p - 1) / p * bytes / bandwidth + service

    with ``cost.transfer`` = bytes / bandwidth of the whole model and ``cost.service`` the round's
    own arithmetic (0 unless configured). p = 1: no message, the service alone.
    """
    hops = 2 * (num_workers - 1)
    return hops * cost.latency + hops / num_workers * cost.transfer + cost.service


@dataclass(frozen=True)
class ExchangeTimes:
    """When one exchange happened, in virtual time."""

    worker: int
    sent: float
    arrived: float
    served: float
    """When the server started handling it (``served - arrived`` is the queueing wait)."""
    done: float
    replied: float
    """When the reply reached the worker."""


class ServerQueue:
    """A server that handles one exchange at a time, first come first served."""

    def __init__(self, cost: ExchangeCost) -> None:
        self.cost = cost
        self.free_at = 0.0

    def book(self, worker: int, sent: float) -> ExchangeTimes:
        """Reserve the server for an exchange sent at ``sent``; its times."""
        arrived = sent + self.cost.one_way
        served = max(arrived, self.free_at)
        done = served + self.cost.service
        self.free_at = done
        return ExchangeTimes(worker, sent, arrived, served, done, done + self.cost.one_way)


def message_bytes(num_params: int, compression: str = "none") -> int:
    """Bytes of one message carrying ``num_params`` values: float32, or in the compressed format
    ``compression`` (:func:`easgd.comm.compression.payload_bytes`, its prefix included)."""
    if compression == "none":
        return num_params * FLOAT_BYTES + HEADER_BYTES
    return payload_bytes(compression, num_params) + HEADER_BYTES


def exchange_cost(
    *,
    latency_s: float,
    bandwidth_gbps: float | None,
    service_s: float,
    num_params: int,
    step_time_s: float,
    compression: str = "none",
) -> ExchangeCost:
    """Physical figures -> charges in steps: every time divided by the model's step time.

    Request and reply carry ``num_params`` values each in the wire format ``compression``."""
    if step_time_s <= 0:
        raise ValueError(f"cost.step_time_s must be > 0, got {step_time_s!r}")
    transfer_s = (
        0.0
        if bandwidth_gbps is None
        else message_bytes(num_params, compression) * 8 / (bandwidth_gbps * 1e9)
    )
    return ExchangeCost(
        latency=latency_s / step_time_s,
        transfer=transfer_s / step_time_s,
        service=service_s / step_time_s,
    )


# -- calibration on this machine ----------------------------------------------------------------


def cache_path() -> Path:
    """Where calibrations are kept: $EASGD_CACHE_DIR or ~/.cache/easgd, file cost_calibration.json."""
    root = os.environ.get("EASGD_CACHE_DIR") or Path.home() / ".cache" / "easgd"
    return Path(root) / "cost_calibration.json"


def calibration_key(description: dict[str, Any]) -> str:
    """A stable key for a model/batch description on this host and torch version."""
    full = {**description, "host": platform.node(), "torch": torch.__version__}
    return hashlib.sha1(json.dumps(full, sort_keys=True).encode()).hexdigest()[:16]


def cached(description: dict[str, Any], measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``measure()``'s figures for ``description``, measured once per host and torch version.

    The cache file holds one entry per key (:func:`calibration_key`); it is written atomically.
    """
    key = calibration_key(description)
    path = cache_path()
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        data = {}
    if key in data:
        return dict(data[key]["figures"])
    figures = measure()
    data[key] = {"description": description, "figures": figures}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
    return figures


def median_time_s(action: Any, *, repeats: int, warmup: int = 3) -> float:
    """Median wall time of ``action()`` over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        action()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _echo_pair(rank: int, numel: int, rounds: int, init_file: str, out: Any) -> None:
    """One side of a 2-process gloo pair: rank 1 times round trips, rank 0 echoes them."""
    import torch.distributed as dist

    from easgd.comm.message import Header, Op
    from easgd.comm.transport import PairTransport

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        results = {}
        for size in (1, numel):
            transport = PairTransport(peer=1 - rank, group=None, numel=size)
            payload = torch.ones(size)
            times = []
            for index in range(rounds + 3):
                if rank == 1:
                    started = time.perf_counter()
                    transport.send(Header(Op.EXCHANGE, step=index), payload)
                    transport.recv()
                    times.append(time.perf_counter() - started)
                else:
                    _, received = transport.recv()
                    assert received is not None
                    transport.send(Header(Op.REPLY, step=index), received.clone())
            if rank == 1:
                results[size] = statistics.median(times[3:])
        if rank == 1:
            out.put(results)
    finally:
        dist.destroy_process_group()


def measure_gloo_exchange(numel: int, *, rounds: int = 50) -> tuple[float, float | None]:
    """(one-way latency s, bandwidth Gb/s or None) of a real gloo pair on this machine.

    Two fresh processes exchange a 1-value and a ``numel``-value message through easgd's own
    transport; latency is half the tiny round trip, bandwidth the model message's extra bytes over
    half its extra time.
    """
    import multiprocessing as mp
    import tempfile

    context = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as scratch:
        init_file = os.path.join(scratch, "init")
        out = context.Queue()
        procs = [
            context.Process(target=_echo_pair, args=(rank, numel, rounds, init_file, out))
            for rank in (0, 1)
        ]
        for proc in procs:
            proc.start()
        try:
            results = out.get(timeout=120)
        finally:
            for proc in procs:
                proc.join(timeout=30)
    tiny, full = results[1], results[numel]
    latency = tiny / 2
    extra = (full - tiny) / 2
    extra_bytes = (numel - 1) * FLOAT_BYTES
    bandwidth = extra_bytes * 8 / extra / 1e9 if extra > 0 and extra_bytes > 0 else None
    return latency, bandwidth
