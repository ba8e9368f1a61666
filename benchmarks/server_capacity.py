"""How fast the parameter server exchanges, against raw gloo moving float32 of the same size.

For 1M, 10M and 25M float32 parameters and p = 1, 2, 4 workers (one process each, plus the
server), each worker does back-to-back round trips with no compute, alternating in one run
(repetitions, a barrier between phases, so background load hits every phase alike):
1. raw ``dist.send``/``dist.recv`` of the float32 payload to an echo thread on the server (its
   own pair groups): the floor for moving those bytes over gloo;
2. real EASGD exchanges through the parameter server (framing, the lock, the elastic update, the
   reply), in each wire format: ``none`` (float32, pipelined), ``none-whole`` (float32 whole
   messages, the exchange before the pipeline), ``bf16`` and ``int8`` (compressed
   with error feedback, pipelined).
Figures per repetition: model parameters per second summed over workers, ours / raw float32
(targets: float32 >= 0.9 at 10M and 25M, p = 1; bf16 >= 1.8 and int8 >= 3.5 at 10M/25M, p = 1, 2,
4); min and median over repetitions.

Both over loopback (this machine's gloo without a network: the transfer is itself CPU work on the
same two cores) and over a link shaped to ``--rate-mbit`` (default 1 Gbit/s): the workers run in a
network namespace behind a veth pair whose two ends ``tc tbf`` limits (benchmarks/_netns.py; needs
root, skipped with a message otherwise), and the raw float32 baseline crosses the same link.

Then, in one process and one thread, the server's update alone (``ElasticServer.handle(out=
payload)``, the compiled one-pass update) against a ``torch.add_`` of the same size, interleaved
(target 0.6); the eager chunked update and the former allocating form are timed alongside. Last,
the server's peak memory per parameter with p receive buffers.

    python benchmarks/server_capacity.py            # full (~25 min; 5 processes on 2 cores at p = 4)
    python benchmarks/server_capacity.py --quick    # 1M parameters, p = 1, 2 (~1 min)
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _common import parser, suffix, write_csv, write_json  # noqa: E402
from _memory import peak_bytes, reset_peak, rss_bytes  # noqa: E402
from _netns import (
    SERVER_END,
    SERVER_IP,
    WORKER_END,
    burst_bytes,
    enter_namespace,
    link_down,
    link_up,
)  # noqa: E402
from torch import Tensor  # noqa: E402

from easgd import algorithms as alg  # noqa: E402
from easgd.comm.compression import Compression  # noqa: E402
from easgd.comm.groups import DistEnv, init_pair_groups  # noqa: E402
from easgd.comm.message import Header, Op  # noqa: E402
from easgd.comm.transport import PIECE_VALUES, PairTransport, pair_transport  # noqa: E402
from easgd.engine.server import ParameterServer  # noqa: E402
from easgd.engine.supervisor import Supervision, Supervisor  # noqa: E402
from easgd.engine.worker import handshake  # noqa: E402
from easgd.parts.runlog import RunLog  # noqa: E402
from easgd.roles import ElasticServer  # noqa: E402
from easgd.topologies.launch import start_processes  # noqa: E402


@dataclass(frozen=True)
class Plan:
    """How long each cell is timed."""

    warmup: int
    """Phases of each kind before timing (the echo threads serve them too)."""
    reps: int
    """Timed repetitions of each phase, raw and ours alternating."""
    min_rounds: int
    values_per_phase: float
    """Round trips per phase: this many values moved, at least ``min_rounds`` round trips."""

    def rounds(self, size: int) -> int:
        return max(self.min_rounds, int(self.values_per_phase / size))


LOOPBACK, QUICK = Plan(2, 7, 4, 4e7), Plan(2, 7, 4, 4e6)
SHAPED, QUICK_SHAPED = Plan(1, 3, 2, 2e7), Plan(1, 2, 2, 2e6)
"""Over a shaped link a 25M round trip of raw float32 takes 1.6 s at 1 Gbit/s: fewer, longer
phases (the ratios' spread over repetitions is smaller there than on loopback)."""
FORMATS = ("none", "none-whole", "bf16", "int8")
"""The default cells; ``--formats`` may add ``bf16-whole`` and ``int8-whole``."""
TARGETS = {"none": 0.9, "bf16": 1.8, "int8": 3.5}
"""Parameters/s against raw float32 gloo (none: at p = 1 only), at 10M and 25M parameters."""
TARGET_UPDATE = 0.6


def _echo(group: dist.ProcessGroup, rank: int, size: int, rounds: int) -> None:
    buffer = torch.empty(size)
    for _ in range(rounds):
        dist.recv(buffer, rank, group=group)
        dist.send(buffer, rank, group=group)


def _transport(name: str, rank: int, peer: int, group: Any, size: int) -> PairTransport:
    base = name.removesuffix("-whole")
    compression = None if base == "none" else Compression(base, True, True, size)
    return pair_transport(compression, worker=rank != 0, peer=peer, group=group, numel=size)


def _serve(name: str, groups: dict[int, Any], size: int) -> None:
    role = ElasticServer(torch.zeros(size), moving_rate=0.1)
    # built before timing (a run builds them in the background): the whole and the per-piece update
    role.compile_update(background=False, part_values=PIECE_VALUES)
    transports = {r: _transport(name, 0, r, g, size) for r, g in groups.items()}
    server = ParameterServer(role, transports)
    server.pipeline = not name.endswith("-whole")
    with tempfile.TemporaryDirectory() as tmp:
        runlog = RunLog(tmp, tensorboard=False)
        Supervisor(server, lambda point: {"test_loss": 0.0, "test_error": 0.0}, runlog,
                   Supervision(eval_interval_s=3600)).run()  # fmt: skip
        runlog.close()


def _timed(action: Any, rounds: int) -> float:
    started = time.perf_counter()
    for _ in range(rounds):
        action()
    return time.perf_counter() - started


def bench_process(
    sizes: list[int], names: list[str], plan: Plan, shaped: bool = False
) -> list[dict[str, Any]] | None:
    """Rank 0 serves (an echo thread per worker on its own groups, and the parameter server);
    ranks >= 1 alternate raw round trips and exchanges, in step with each other. ``shaped``: the
    workers move into the shaped link's namespace first, so every byte between them and the
    server (raw and ours alike) crosses the rate-limited veth pair."""
    torch.set_num_threads(1)
    env = DistEnv.from_environ()
    if shaped:
        os.environ["MASTER_ADDR"] = SERVER_IP  # the agent's store listens on every address here
        os.environ["GLOO_SOCKET_IFNAME"] = SERVER_END if env.rank == 0 else WORKER_END
        if env.rank != 0:
            enter_namespace()
    pairs = init_pair_groups(env, backend="gloo", timeout_s=600)
    raw_groups = {w: dist.new_group([0, w]) for w in range(1, env.world_size)}
    workers = dist.new_group(list(range(1, env.world_size)))
    results = []
    for size in sizes:
        rounds = plan.rounds(size)
        for name in names:
            dist.barrier()
            if env.rank == 0:
                echoes = [
                    threading.Thread(target=_echo, args=(raw_groups[r], r, size, (plan.warmup + plan.reps) * rounds))
                    for r in pairs.groups
                ]  # fmt: skip
                for thread in echoes:
                    thread.start()
                _serve(name, pairs.groups, size)
                for thread in echoes:
                    thread.join()
                continue
            raw_group, payload, back = raw_groups[env.rank], torch.ones(size), torch.empty(size)

            def raw(group: Any = raw_group, payload: Tensor = payload, back: Tensor = back) -> None:
                dist.send(payload, 0, group=group)
                dist.recv(back, 0, group=group)

            transport = _transport(name, env.rank, 0, pairs.groups[env.rank], size)
            params = handshake(transport) + 0.5
            step = iter(range(10**9))

            def ours(
                transport: PairTransport = transport, params: Tensor = params, step: Any = step
            ) -> None:
                transport.send(Header(Op.EXCHANGE, step=next(step)), params)
                header, reply = transport.recv()
                assert reply is not None and not header.error
                params.sub_(reply)  # x_i -= e: the worker's side of the exchange

            _timed(raw, plan.warmup * rounds)  # the echo threads serve (warmup + reps) * rounds
            _timed(ours, plan.warmup)
            raw_s, ours_s = [], []
            for _ in range(plan.reps):
                dist.barrier(group=workers)
                raw_s.append(_timed(raw, rounds))
                dist.barrier(group=workers)
                ours_s.append(_timed(ours, rounds))
            transport.send(Header(Op.DONE, step=next(step)))
            transport.recv()
            results.append({"size": size, "name": name, "rounds": rounds,
                            "raw_s": raw_s, "ours_s": ours_s})  # fmt: skip
    dist.destroy_process_group()
    return results if env.rank != 0 else None


def exchange_rows(
    sizes: list[int],
    worker_counts: tuple[int, ...],
    plan: Plan,
    names: list[str],
    link: str = "loopback",
) -> list[dict[str, Any]]:
    rows = []
    for p in worker_counts:
        per_rank = start_processes(bench_process, p + 1, sizes, names, plan, link != "loopback")
        cells = [[c for c in per_rank[r]] for r in range(1, p + 1)]
        for index, cell in enumerate(cells[0]):
            size, name, rounds = cell["size"], cell["name"], cell["rounds"]
            ratios, raw_rates, our_rates = [], [], []
            for rep in range(plan.reps):
                raw = sum(rounds * size / c[index]["raw_s"][rep] for c in cells)
                ours = sum(rounds * size / c[index]["ours_s"][rep] for c in cells)
                raw_rates.append(raw)
                our_rates.append(ours)
                ratios.append(ours / raw)
            base = name.removesuffix("-whole")
            target = TARGETS[base] if size >= 10**7 and (base != "none" or p == 1) else None
            median = statistics.median(ratios)
            rows.append({
                "link": link, "workers": p, "params": size, "format": name, "rounds_per_rep": rounds,
                "raw_Mparams_per_s": statistics.median(raw_rates) / 1e6,
                "ours_Mparams_per_s": statistics.median(our_rates) / 1e6,
                "ratio_min": min(ratios), "ratio_median": median,
                "target": target if target is not None else math.nan,
                "met": "" if target is None else ("yes" if median >= target else "no"),
            })  # fmt: skip
    return rows


def update_rows(sizes: list[int], repeats: int) -> list[dict[str, Any]]:
    """The server's update alone against one add_ of the same size, interleaved, one thread."""
    torch.set_num_threads(1)
    rows = []
    for size in sizes:
        generator = torch.Generator().manual_seed(0)
        center, payload, other = torch.randn(3, size, generator=generator)
        role = ElasticServer(center, moving_rate=0.1)
        role.compile_update(background=False)
        eager = ElasticServer(center, moving_rate=0.1)

        def add(center: Tensor = center, other: Tensor = other) -> None:
            center.add_(other)

        def update(role: ElasticServer = role, payload: Tensor = payload) -> None:
            role.handle(0, payload, out=payload)

        def chunked(role: ElasticServer = eager, payload: Tensor = payload) -> None:
            role.handle(0, payload, out=payload)

        def pure(center: Tensor = center, payload: Tensor = payload) -> None:
            alg.apply_to_center(center, alg.elastic_difference(payload, center, moving_rate=0.1))

        actions = {"add": add, "update": update, "eager": chunked}
        times: dict[str, list[float]] = {name: [] for name in actions}
        for action in actions.values():
            action()
        for _ in range(repeats):  # interleaved: each figure sees the same machine state
            for name, action in actions.items():
                times[name].append(_timed(action, 1))
        # the allocating form apart: its fresh pages would evict the others' data from the cache
        times["pure"] = [_timed(pure, 1) for _ in range(3)]
        ratios = [a / u for a, u in zip(times["add"], times["update"], strict=True)]
        add_s, update_s, eager_s, pure_s = (statistics.median(times[n]) for n in times)
        rows.append({
            "params": size, "compiled": role.fused is not None and role.fused.ready.is_set(),
            "add_ms": 1000 * add_s, "update_ms": 1000 * update_s, "eager_update_ms": 1000 * eager_s,
            "pure_update_ms": 1000 * pure_s, "add_GB_per_s": 12 * size / add_s / 1e9,
            "ratio_min": min(ratios), "ratio_median": statistics.median(ratios),
            "eager_ratio": add_s / eager_s, "pure_ratio": add_s / pure_s, "target": TARGET_UPDATE,
            "met": "yes" if statistics.median(ratios) >= TARGET_UPDATE else "no",
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
    links = list(dict.fromkeys(r["link"] for r in rows))
    fig, axes = plt.subplots(1, len(links) + 1, figsize=(5.5 * (len(links) + 1), 4), squeeze=False)
    styles = {"none": "-", "none-whole": ":", "bf16": "--", "int8": "-."}
    for left, link in zip(axes[0], links, strict=False):
        mine = [r for r in rows if r["link"] == link]
        for name in sorted({r["format"] for r in mine}):
            for p in sorted({r["workers"] for r in mine}):
                cells = [r for r in mine if r["workers"] == p and r["format"] == name]
                if cells:
                    left.plot([c["params"] / 1e6 for c in cells], [c["ratio_median"] for c in cells],
                              "o" + styles.get(name, ":"), label=f"{name} p={p}")  # fmt: skip
        for name, target in TARGETS.items():
            left.axhline(target, color="gray", ls=styles[name], lw=0.8)
        left.set_xscale("log")
        left.set_xlabel("parameters (millions)")
        left.set_ylabel("parameters/s: exchange / raw float32 gloo")
        left.legend(fontsize=6, ncol=2)
        left.set_title(f"{link}: exchange vs raw send/recv (gray: targets)", fontsize=9)
    right = axes[0][-1]
    x = [f"{u['params'] / 1e6:g}M" for u in updates]
    width = 0.27
    for offset, key, label in ((-1, "ratio_median", "compiled (now)"),
                               (0, "eager_ratio", "eager chunks"),
                               (1, "pure_ratio", "allocating")):  # fmt: skip
        right.bar([i + offset * width for i in range(len(x))], [u[key] for u in updates], width,
                  label=label)  # fmt: skip
    right.axhline(TARGET_UPDATE, color="gray", ls="--", lw=1, label="target")
    right.set_xticks(list(range(len(x))), x)
    right.set_ylabel("add_ time / update time")
    right.set_title("Center update vs memory bandwidth")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(
    rows: list[dict[str, Any]], updates: list[dict[str, Any]], memory: list[dict[str, Any]]
) -> None:
    """Print the figures (also from a saved JSON: report(d["exchanges"], d["update"], d["memory"]))."""
    print(f"{'link':>16s} {'p':>2s} {'params':>7s} {'format':>10s} {'raw Mp/s':>9s} {'ours Mp/s':>9s} "
          f"{'min':>6s} {'median':>6s} {'target':>6s} met")  # fmt: skip
    for r in rows:
        print(f"{r['link']:>16s} {r['workers']:2d} {r['params'] / 1e6:6.0f}M {r['format']:>10s} "
              f"{r['raw_Mparams_per_s']:9.1f} {r['ours_Mparams_per_s']:9.1f} {r['ratio_min']:6.3f} "
              f"{r['ratio_median']:6.3f} {r['target']:6.2f} {r['met']}")  # fmt: skip
    print(f"update alone vs add_ (target {TARGET_UPDATE}, median of interleaved ratios):")
    for u in updates:
        print(f"  {u['params'] / 1e6:4.0f}M add_ {u['add_ms']:7.2f} ms ({u['add_GB_per_s']:.1f} GB/s), "
              f"update {u['update_ms']:7.2f} ms: ratio {u['ratio_median']:.3f} (min {u['ratio_min']:.3f}; "
              f"compiled {u['compiled']}; eager chunks {u['eager_ratio']:.3f}, allocating "
              f"{u['pure_ratio']:.3f}) {u['met']}")  # fmt: skip
    for m in memory:
        print(
            f"server peak memory, p={m['workers']}: {m['bytes_per_param']:.1f} bytes/param "
            f"(center + p receive buffers = {m['needed']})"
        )


def main() -> None:
    cli = parser(__doc__ or "")
    cli.add_argument("--sizes", type=float, nargs="+", help="parameter counts (e.g. 1e7 2.5e7)")
    cli.add_argument("--workers", type=int, nargs="+", help="worker counts (e.g. 1 2 4)")
    cli.add_argument("--formats", nargs="+", default=list(FORMATS), help="cells (see FORMATS)")
    cli.add_argument("--rate-mbit", type=float, nargs="*", default=None,
                     help="shaped links to measure over besides loopback, Mbit/s (default: 1000; "
                          "none with --quick); needs root, skipped with a message otherwise")  # fmt: skip
    cli.add_argument("--no-loopback", action="store_true", help="measure the shaped links only")
    args = cli.parse_args()
    quick = args.quick
    sizes = [10**6] if quick else [10**6, 10**7, 25 * 10**6]
    worker_counts = (1, 2) if quick else (1, 2, 4)
    rates = args.rate_mbit if args.rate_mbit is not None else ([] if quick else [1000.0])
    if args.sizes:
        sizes = [int(size) for size in args.sizes]
    if args.workers:
        worker_counts = tuple(args.workers)
    rows = [] if args.no_loopback else exchange_rows(
        sizes, worker_counts, QUICK if quick else LOOPBACK, args.formats
    )  # fmt: skip
    skipped, links = None, {}
    for rate in rates:
        skipped = link_up(rate)
        if skipped is not None:
            print(f"shaped link skipped: {skipped}")
            break
        try:
            # whole-message cells are loopback's history; the shaped link times the pipelines
            names = [name for name in args.formats if not name.endswith("-whole")]
            big = [size for size in sizes if size >= 10**7] or sizes
            plan, link = QUICK_SHAPED if quick else SHAPED, f"tbf {rate:g} Mbit/s"
            links[link] = {"rate_mbit": rate, "burst_bytes": burst_bytes(rate)}
            rows += exchange_rows(big, worker_counts, plan, names, link)
        finally:
            link_down()
    updates = update_rows(sizes, 5 if quick else 15)
    memory = memory_rows(sizes[-1], (1, 4))
    tag = suffix(quick)
    write_csv(args.out / f"server_capacity{tag}.csv", rows)
    write_csv(args.out / f"server_update{tag}.csv", updates)
    plans = {"loopback": LOOPBACK.__dict__, "shaped": SHAPED.__dict__}
    write_json(args.out / f"server_capacity{tag}.json",
               {"threads": 1, "plans": plans, "shaped_skipped": skipped, "links": links, "exchanges": rows,
                "update": updates, "memory": memory})  # fmt: skip
    plot(rows, updates, str(args.out / f"server_capacity{tag}.png"))
    report(rows, updates, memory)


if __name__ == "__main__":
    main()
