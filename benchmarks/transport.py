"""Exchange round-trip time and throughput of the real server, against raw gloo send/recv.

For each payload size (floats) and number of workers p, every worker times round trips (after 3
untimed ones; medians reported) in three phases, in the same processes, one after the other:
1. raw ``dist.send``/``dist.recv`` of the payload to an echo thread on the server: the floor for
   moving those bytes over gloo;
2. easgd's transport alone (PairTransport: header, framing or staging), echoed the same way;
3. real EASGD exchanges through the parameter server (its lock and the elastic update, which
   costs a few passes over the payload's memory).
The figures are throughput ratios raw_rtt / transport_rtt and raw_rtt / exchange_rtt (target:
at least 0.9).

    python benchmarks/transport.py            # 1e3..1e7 floats, p = 1, 2, 4, 8
    python benchmarks/transport.py --quick    # 1e3, 1e5, 1e6 floats, p = 1, 2 (< 1 min)
"""

from __future__ import annotations

import tempfile
import threading
import time
from typing import Any

import torch
import torch.distributed as dist
from _common import parser, suffix, write_csv, write_json

from easgd.comm.groups import DistEnv, init_pair_groups
from easgd.comm.message import Header, Op
from easgd.comm.transport import PairTransport
from easgd.roles import ElasticServer, ElasticWorker
from easgd.runtime.launcher import start_processes
from easgd.runtime.runlog import RunLog
from easgd.runtime.server import ParameterServer, StopRule
from easgd.runtime.worker import WorkerLoop, handshake

WARMUP = 3


def rounds_for(size: int) -> int:
    return int(max(10, min(200, 3e7 / size)))


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def bench_process(sizes: list[int]) -> list[dict[str, Any]] | None:
    """One process of the benchmark: rank 0 serves, ranks >= 1 time their round trips."""
    torch.set_num_threads(1)
    env = DistEnv.from_environ()
    pairs = init_pair_groups(env, backend="gloo", timeout_s=120)
    results = []
    for size in sizes:
        rounds = rounds_for(size)
        # -- raw gloo: echo the payload back
        dist.barrier()
        if env.rank == 0:

            def echo(
                rank: int, group: dist.ProcessGroup, size: int = size, rounds: int = rounds
            ) -> None:
                buffer = torch.empty(size)
                for _ in range(WARMUP + rounds):
                    dist.recv(buffer, rank, group=group)
                    dist.send(buffer, rank, group=group)

            threads = [threading.Thread(target=echo, args=item) for item in pairs.groups.items()]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        else:
            group = pairs.groups[env.rank]
            payload, back = torch.ones(size), torch.empty(size)
            times = []
            for _ in range(WARMUP + rounds):
                started = time.perf_counter()
                dist.send(payload, 0, group=group)
                dist.recv(back, 0, group=group)
                times.append(time.perf_counter() - started)
            raw = median(times[WARMUP:])
        # -- the transport alone: easgd's messages (header + payload, framing, staging), echoed
        dist.barrier()
        if env.rank == 0:

            def echo_transport(
                rank: int, group: dist.ProcessGroup, size: int = size, rounds: int = rounds
            ) -> None:
                transport = PairTransport(peer=rank, group=group, numel=size)
                for _ in range(WARMUP + rounds):
                    header, body = transport.recv()
                    transport.send(Header(Op.REPLY), body)

            threads = [
                threading.Thread(target=echo_transport, args=item) for item in pairs.groups.items()
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        else:
            transport = PairTransport(peer=0, group=pairs.groups[env.rank], numel=size)
            times = []
            for _ in range(WARMUP + rounds):
                started = time.perf_counter()
                transport.send(Header(Op.EXCHANGE), payload)
                transport.recv()
                times.append(time.perf_counter() - started)
            transport_only = median(times[WARMUP:])
        # -- real exchanges through the parameter server
        dist.barrier()
        if env.rank == 0:
            transports = {
                r: PairTransport(peer=r, group=g, numel=size) for r, g in pairs.groups.items()
            }
            with tempfile.TemporaryDirectory() as tmp:
                runlog = RunLog(tmp, tensorboard=False)
                ParameterServer(
                    ElasticServer(torch.zeros(size), moving_rate=0.1), transports,
                    evaluate=lambda point: {"test_loss": 0.0, "test_error": 0.0}, runlog=runlog,
                    stop_rule=StopRule(), eval_interval_s=3600, total_steps=0, progress=False,
                ).run()  # fmt: skip
                runlog.close()
        else:
            transport = PairTransport(peer=0, group=pairs.groups[env.rank], numel=size)
            role = ElasticWorker(
                handshake(transport), comm_period=1, learning_rate=0.0, momentum=0.0
            )
            zero = torch.zeros(size)
            loop = WorkerLoop(
                role, transport, lambda point, zero=zero: (0.0, zero), steps=WARMUP + rounds
            )
            loop.run()
            results.append({
                "floats": size, "bytes": 4 * size, "rounds": rounds,
                "raw_rtt_ms": 1000 * raw, "transport_rtt_ms": 1000 * transport_only,
                "exchange_rtt_ms": median(loop.round_trips_ms[WARMUP:]),
            })  # fmt: skip
    dist.destroy_process_group()
    return results if env.rank != 0 else None


def main() -> None:
    args = parser(__doc__ or "").parse_args()
    quick = args.quick
    sizes = [10**3, 10**5, 10**6] if quick else [10**3, 10**4, 10**5, 10**6, 10**7]
    worker_counts = (1, 2) if quick else (1, 2, 4, 8)
    rows = []
    for p in worker_counts:
        per_rank = start_processes(bench_process, p + 1, sizes)
        for i, size in enumerate(sizes):
            cells = [per_rank[r][i] for r in range(1, p + 1)]
            raw = sum(c["raw_rtt_ms"] for c in cells) / p
            transport_only = sum(c["transport_rtt_ms"] for c in cells) / p
            ours = sum(c["exchange_rtt_ms"] for c in cells) / p
            rows.append({
                "workers": p, "floats": size, "bytes": 4 * size, "raw_rtt_ms": raw, "transport_rtt_ms": transport_only, "exchange_rtt_ms": ours,
                "ratio_raw_over_transport": raw / transport_only,
                "exchange_MB_per_s_per_worker": 2 * 4 * size / ours / 1e3,
                "ratio_raw_over_exchange": raw / ours,
            })  # fmt: skip
    tag = suffix(quick)
    write_csv(args.out / f"transport{tag}.csv", rows)
    write_json(args.out / f"transport{tag}.json", {"rows": rows, "target": 0.9})
    print(
        f"{'p':>2s} {'floats':>9s} {'raw ms':>9s} {'transp ms':>9s} {'exch ms':>9s} {'MB/s':>8s} {'transp':>6s} {'exch':>6s}"
    )
    for r in rows:
        print(f"{r['workers']:2d} {r['floats']:9.0e} {r['raw_rtt_ms']:9.3f} {r['transport_rtt_ms']:9.3f} "
              f"{r['exchange_rtt_ms']:9.3f} {r['exchange_MB_per_s_per_worker']:8.1f} "
              f"{r['ratio_raw_over_transport']:6.3f} {r['ratio_raw_over_exchange']:6.3f}")  # fmt: skip
    print(
        "ratios = raw RTT / easgd RTT (transport alone; whole exchange with the server's update); target 0.9"
    )


if __name__ == "__main__":
    main()
