"""How many exchanges the parameter server sustains, against raw gloo moving the same bytes.

For 1M, 10M and 25M float32 parameters and p = 1, 2, 4 workers (one process each, plus the
server), each worker does back-to-back round trips with no compute, in two phases in the same
processes:
1. raw ``dist.send``/``dist.recv`` of the payload to an echo thread per pair on the server: the
   floor for moving those bytes over gloo;
2. real EASGD exchanges through the parameter server (framing, the lock, the elastic update in
   place, the reply from the worker's own receive buffer).
Figures: exchanges/s and bytes/s summed over workers, and their ratio ours / raw (target 0.9).

Then, in one process and one thread, the server's update alone (ElasticServer.handle: e and the
center in one pass) against a ``torch.add_`` of the same size, the memory-bandwidth yardstick
(target 0.5); the former allocating form (pure functions) is timed alongside. Last, the server's
peak memory per parameter with p receive buffers.

    python benchmarks/server_capacity.py            # full (~4 min; 5 processes on 2 cores at p = 4)
    python benchmarks/server_capacity.py --quick    # 1M parameters, p = 1, 2 (< 1 min)
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import tempfile
import threading
import time
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _common import parser, suffix, write_csv, write_json  # noqa: E402
from _memory import peak_bytes, reset_peak, rss_bytes  # noqa: E402
from torch import Tensor  # noqa: E402

from easgd import algorithms as alg  # noqa: E402
from easgd.comm.groups import DistEnv, init_pair_groups  # noqa: E402
from easgd.comm.message import Header, Op  # noqa: E402
from easgd.comm.transport import PairTransport  # noqa: E402
from easgd.engine.server import ParameterServer  # noqa: E402
from easgd.engine.supervisor import Supervision, Supervisor  # noqa: E402
from easgd.engine.worker import handshake  # noqa: E402
from easgd.parts.runlog import RunLog  # noqa: E402
from easgd.roles import ElasticServer  # noqa: E402
from easgd.topologies.launch import start_processes  # noqa: E402

WARMUP = 2
TARGET_EXCHANGE, TARGET_UPDATE = 0.9, 0.5


def rounds_for(size: int, quick: bool) -> int:
    return max(3, int((1.5e7 if quick else 8e7) / size))


def _echo(group: dist.ProcessGroup, rank: int, size: int, rounds: int) -> None:
    buffer = torch.empty(size)
    for _ in range(WARMUP + rounds):
        dist.recv(buffer, rank, group=group)
        dist.send(buffer, rank, group=group)


def bench_process(sizes: list[int], quick: bool) -> list[dict[str, Any]] | None:
    """Rank 0 serves (echo threads, then the parameter server); ranks >= 1 time round trips."""
    torch.set_num_threads(1)
    env = DistEnv.from_environ()
    pairs = init_pair_groups(env, backend="gloo", timeout_s=300)
    results = []
    for size in sizes:
        rounds = rounds_for(size, quick)
        dist.barrier()
        if env.rank == 0:
            threads = [
                threading.Thread(target=_echo, args=(group, rank, size, rounds))
                for rank, group in pairs.groups.items()
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        else:
            group = pairs.groups[env.rank]
            payload, back = torch.ones(size), torch.empty(size)
            for i in range(WARMUP + rounds):
                if i == WARMUP:
                    started = time.perf_counter()
                dist.send(payload, 0, group=group)
                dist.recv(back, 0, group=group)
            raw_s = time.perf_counter() - started
            del back
        dist.barrier()
        if env.rank == 0:
            transports = {
                r: PairTransport(peer=r, group=g, numel=size) for r, g in pairs.groups.items()
            }
            with tempfile.TemporaryDirectory() as tmp:
                runlog = RunLog(tmp, tensorboard=False)
                Supervisor(
                    ParameterServer(ElasticServer(torch.zeros(size), moving_rate=0.1), transports),
                    lambda point: {"test_loss": 0.0, "test_error": 0.0},
                    runlog, Supervision(eval_interval_s=3600),
                ).run()  # fmt: skip
                runlog.close()
        else:
            transport = PairTransport(peer=0, group=pairs.groups[env.rank], numel=size)
            params = handshake(transport)
            for i in range(WARMUP + rounds):
                if i == WARMUP:
                    started = time.perf_counter()
                transport.send(Header(Op.EXCHANGE, step=i), params)
                transport.recv()
            ours_s = time.perf_counter() - started
            transport.send(Header(Op.DONE, step=WARMUP + rounds))
            transport.recv()
            results.append({"size": size, "rounds": rounds, "raw_s": raw_s, "ours_s": ours_s})
    dist.destroy_process_group()
    return results if env.rank != 0 else None


def exchange_rows(
    sizes: list[int], worker_counts: tuple[int, ...], quick: bool
) -> list[dict[str, Any]]:
    rows = []
    for p in worker_counts:
        per_rank = start_processes(bench_process, p + 1, sizes, quick)
        for i, size in enumerate(sizes):
            cells = [per_rank[r][i] for r in range(1, p + 1)]
            raw = sum(c["rounds"] / c["raw_s"] for c in cells)
            ours = sum(c["rounds"] / c["ours_s"] for c in cells)
            rows.append({
                "workers": p, "params": size, "rounds_per_worker": cells[0]["rounds"],
                "raw_exchanges_per_s": raw, "ours_exchanges_per_s": ours,
                "ours_MB_per_s": ours * 2 * 4 * size / 1e6, "raw_MB_per_s": raw * 2 * 4 * size / 1e6,
                "ratio": ours / raw, "target": TARGET_EXCHANGE,
            })  # fmt: skip
    return rows


def best_of(fn: Any, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def update_rows(sizes: list[int], repeats: int) -> list[dict[str, Any]]:
    """The server's update alone against one add_ of the same size, interleaved, one thread."""
    torch.set_num_threads(1)
    rows = []
    for size in sizes:
        generator = torch.Generator().manual_seed(0)
        center, payload, other = torch.randn(3, size, generator=generator)
        role = ElasticServer(center, moving_rate=0.1)
        adds, updates, pures = [], [], []

        def add(center: Tensor = center, other: Tensor = other) -> None:
            center.add_(other)

        def update(role: ElasticServer = role, payload: Tensor = payload) -> None:
            role.handle(0, payload, out=payload)

        def pure(center: Tensor = center, payload: Tensor = payload) -> None:
            alg.apply_to_center(center, alg.elastic_difference(payload, center, moving_rate=0.1))

        for _ in range(repeats):  # interleaved: each figure sees the same machine state
            adds.append(best_of(add, 1))
            updates.append(best_of(update, 1))
            pures.append(best_of(pure, 1))
        add_s, update_s, pure_s = (statistics.median(t) for t in (adds, updates, pures))
        rows.append({
            "params": size, "add_ms": 1000 * add_s, "update_ms": 1000 * update_s,
            "pure_update_ms": 1000 * pure_s, "add_GB_per_s": 12 * size / add_s / 1e9,
            "ratio": add_s / update_s, "pure_ratio": add_s / pure_s, "target": TARGET_UPDATE,
        })  # fmt: skip
    return rows


def memory_probe(size: int, workers: int) -> float:
    """Peak bytes per parameter of the server's state and buffers (fresh process)."""
    torch.set_num_threads(1)
    warm = ElasticServer(torch.zeros(8), moving_rate=0.1)
    warm.handle(0, torch.ones(8), out=torch.empty(8))
    baseline = rss_bytes()
    role = ElasticServer(torch.zeros(size), moving_rate=0.1)
    transports = [PairTransport(peer=r, group=None, numel=size) for r in range(1, workers + 1)]
    reset_peak()
    for transport in transports:
        received = transport._in[-size:]  # what recv fills: the payload, overwritten by the reply
        received.fill_(1.0)
        role.handle(0, received, out=received)
    return (peak_bytes() - baseline) / size


def memory_rows(size: int, worker_counts: tuple[int, ...]) -> list[dict[str, Any]]:
    context = mp.get_context("spawn")
    rows = []
    with context.Pool(1, maxtasksperchild=1) as pool:
        for p in worker_counts:
            per_param = pool.apply(memory_probe, (size, p))
            rows.append({"params": size, "workers": p, "bytes_per_param": per_param,
                         "needed": 4 * (1 + p)})  # fmt: skip
    return rows


def plot(rows: list[dict[str, Any]], updates: list[dict[str, Any]], path: str) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for p in sorted({r["workers"] for r in rows}):
        cells = [r for r in rows if r["workers"] == p]
        left.plot(
            [c["params"] / 1e6 for c in cells], [c["ratio"] for c in cells], "o-", label=f"p={p}"
        )
    left.axhline(TARGET_EXCHANGE, color="gray", ls="--", lw=1, label="target")
    left.set_xlabel("parameters (millions)")
    left.set_ylabel("exchanges/s: server / raw gloo")
    left.set_ylim(0, 1.2)
    left.legend(fontsize=8)
    left.set_title("Whole exchange vs raw send/recv")
    x = [f"{u['params'] / 1e6:g}M" for u in updates]
    width = 0.38
    positions = range(len(x))
    right.bar(
        [i - width / 2 for i in positions],
        [u["ratio"] for u in updates],
        width,
        label="in place (now)",
    )
    right.bar(
        [i + width / 2 for i in positions],
        [u["pure_ratio"] for u in updates],
        width,
        label="allocating (before)",
    )
    right.axhline(TARGET_UPDATE, color="gray", ls="--", lw=1, label="target")
    right.set_xticks(list(positions), x)
    right.set_ylabel("add_ time / update time")
    right.set_title("Center update vs memory bandwidth")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(
    rows: list[dict[str, Any]], updates: list[dict[str, Any]], memory: list[dict[str, Any]]
) -> None:
    """Print the figures (also from a saved JSON: report(d["exchanges"], d["update"], d["memory"]))."""
    print(
        f"{'p':>2s} {'params':>9s} {'raw ex/s':>9s} {'ours ex/s':>9s} {'ours MB/s':>9s} {'ratio':>6s}"
    )
    for r in rows:
        print(f"{r['workers']:2d} {r['params'] / 1e6:8.0f}M {r['raw_exchanges_per_s']:9.2f} "
              f"{r['ours_exchanges_per_s']:9.2f} {r['ours_MB_per_s']:9.0f} {r['ratio']:6.3f}")  # fmt: skip
    print(f"target {TARGET_EXCHANGE}; update alone vs add_ (target {TARGET_UPDATE}):")
    for u in updates:
        print(f"  {u['params'] / 1e6:8.0f}M add_ {u['add_ms']:7.2f} ms ({u['add_GB_per_s']:.1f} GB/s), "
              f"update {u['update_ms']:7.2f} ms: ratio {u['ratio']:.3f} (allocating form: {u['pure_ratio']:.3f})")  # fmt: skip
    for m in memory:
        print(
            f"server peak memory, p={m['workers']}: {m['bytes_per_param']:.1f} bytes/param "
            f"(center + p receive buffers = {m['needed']})"
        )


def main() -> None:
    args = parser(__doc__ or "").parse_args()
    quick = args.quick
    sizes = [10**6] if quick else [10**6, 10**7, 25 * 10**6]
    worker_counts = (1, 2) if quick else (1, 2, 4)
    rows = exchange_rows(sizes, worker_counts, quick)
    updates = update_rows(sizes, 5 if quick else 15)
    memory = memory_rows(sizes[-1], (1, 4))
    tag = suffix(quick)
    write_csv(args.out / f"server_capacity{tag}.csv", rows)
    write_csv(args.out / f"server_update{tag}.csv", updates)
    write_json(
        args.out / f"server_capacity{tag}.json",
        {"threads": 1, "exchanges": rows, "update": updates, "memory": memory},
    )
    plot(rows, updates, str(args.out / f"server_capacity{tag}.png"))
    report(rows, updates, memory)


if __name__ == "__main__":
    main()
