"""The simulator's cost clock checked against real runs (issue 21, part 3).

The same configurations run for real (a parameter server and p workers, gloo) and on the
simulator's virtual clock (``mode=simulate``), and the time to the same number of worker steps
is compared: EAMSGD with tau = 10 and DOWNPOUR with tau = 1, p = 1 and 2, a digits MLP of 85k
parameters (a 340 KB message, so an exchange is not free).

1. Loopback: the real run under torchrun; the simulator with ``cost=measured`` (this machine's
   step time, server service time and gloo exchange, calibrated afresh by this script).
2. A bandwidth-limited link: the workers run in a network namespace of their own behind a veth
   pair whose two ends are shaped by ``tc tbf`` to ``--rate-mbit`` (default 100 Mbit/s); the
   server stays in this namespace. The simulator gets the same bandwidth (``cost.bandwidth_gbps``)
   and the loopback calibration's latency. Needs root and ``ip``/``tc``; skipped with a message
   otherwise. Only the namespace and the two addresses it creates (10.77.0.1, 10.77.0.2) are used,
   and both are removed at the end.

The real time to N steps is each worker's N steps over its measured step rate (the slowest
worker's), so process start-up and the handshake, which the simulator does not model, are left
out; the simulated time is the run's virtual wall time. Target: within 15%.

    python benchmarks/clock_check.py           # full: 300 steps per worker (about 3 minutes)
    python benchmarks/clock_check.py --quick   # 40 steps, loopback and shaped (under a minute)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import machine, parser, suffix, write_csv, write_json
from _netns import NAMESPACE, SERVER_END, SERVER_IP, WORKER_END, link_down, link_up

CONFIGS = (("eamsgd", 10, 1), ("eamsgd", 10, 2), ("downpour", 1, 1), ("downpour", 1, 2))
MODEL = ["model.hidden=[256,256]"]
COMMON = ["membership.mode=fixed", "progress=false", "tensorboard=false", "checkpoint.every_s=0"]
TARGET = 0.15


def overrides(algorithm: str, tau: int, workers: int, steps: int, run_dir: Path) -> list[str]:
    return [f"algorithm={algorithm}", f"comm.period={tau}", f"workers={workers}",
            f"steps_per_worker={steps}", *MODEL, *COMMON, f"hydra.run.dir={run_dir}"]  # fmt: skip


def real_time(summary: dict[str, Any]) -> float:
    """Seconds to each worker's N steps: N over the slowest worker's step rate."""
    rates = summary["details"]["worker_steps_per_s"].values()
    return float(summary["steps_per_worker"] / min(rates))


def run(command: list[str], env: dict[str, str] | None = None, timeout: float = 600) -> None:
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:6])} ... failed:\n{result.stderr[-3000:]}")


def simulated(config: tuple[str, int, int], steps: int, extra: list[str], out: Path) -> dict:
    algorithm, tau, workers = config
    run([sys.executable, "-m", "easgd.train", "mode=simulate", "cost=measured",
         *overrides(algorithm, tau, workers, steps, out), *extra])  # fmt: skip
    return dict(json.loads((out / "summary.json").read_text()))


def loopback(config: tuple[str, int, int], steps: int, out: Path) -> dict:
    algorithm, tau, workers = config
    run([sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc_per_node={workers + 1}", "-m", "easgd.train",
         *overrides(algorithm, tau, workers, steps, out)])  # fmt: skip
    return dict(json.loads((out / "summary.json").read_text()))


def shaped(config: tuple[str, int, int], steps: int, out: Path) -> dict:
    """The server here, the workers in the namespace, one process each (the environment torchrun
    would give them; rank 0 hosts the store on the veth address)."""
    algorithm, tau, workers = config
    with socket.socket() as sock:
        sock.bind((SERVER_IP, 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "easgd.train", *overrides(algorithm, tau, workers, steps, out)]
    processes = []
    for rank in range(workers + 1):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": str(workers + 1), "MASTER_ADDR": SERVER_IP, "MASTER_PORT": str(port),
               "GLOO_SOCKET_IFNAME": SERVER_END if rank == 0 else WORKER_END}  # fmt: skip
        prefix = [] if rank == 0 else ["ip", "netns", "exec", NAMESPACE]
        processes.append(subprocess.Popen([*prefix, *command], env=env, stderr=subprocess.PIPE))
    codes = [p.wait(timeout=600) for p in processes]
    if any(codes):
        raise RuntimeError(f"shaped run failed: {processes[0].stderr.read().decode()[-3000:]}")  # type: ignore[union-attr]
    return dict(json.loads((out / "summary.json").read_text()))


def main() -> None:
    arguments = parser(__doc__ or "")
    arguments.add_argument("--rate-mbit", type=int, default=100, help="the shaped link's rate")
    args = arguments.parse_args()
    steps = 40 if args.quick else 300
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="easgd-clock-") as folder:
        scratch = Path(folder)
        # a calibration of its own, measured now beside the real runs (not one cached earlier,
        # perhaps under another load)
        os.environ["EASGD_CACHE_DIR"] = str(scratch / "calibration")
        why = link_up(args.rate_mbit)
        try:
            for index, config in enumerate(CONFIGS):
                name = f"{config[0]} tau={config[1]} p={config[2]}"
                real = loopback(config, steps, scratch / f"real{index}")
                sim = simulated(config, steps, [], scratch / f"sim{index}")
                rows.append(row("loopback", name, steps, real, sim))
                print(format_row(rows[-1]), flush=True)
                if why is not None:
                    continue
                latency_us = 1e6 * sim["details"]["link_latency_s"]
                extra = ["cost.measure_network=false", f"cost.latency_us={latency_us}",
                         f"cost.bandwidth_gbps={args.rate_mbit / 1000}"]  # fmt: skip
                real = shaped(config, steps, scratch / f"shaped{index}")
                sim = simulated(config, steps, extra, scratch / f"shapedsim{index}")
                rows.append(row(f"tbf {args.rate_mbit} Mbit/s", name, steps, real, sim))
                print(format_row(rows[-1]), flush=True)
        finally:
            if why is None:
                link_down()
    if why is not None:
        print(f"bandwidth-limited part skipped: {why}")
    tag = suffix(args.quick)
    write_csv(args.out / f"clock_check{tag}.csv", rows)
    write_json(args.out / f"clock_check{tag}.json",
               {"machine": machine(), "steps_per_worker": steps, "target": TARGET,
                "shaped_skipped": why, "rows": rows})  # fmt: skip
    met = sum(abs(r["sim_over_real"] - 1) <= TARGET for r in rows)
    print(f"within {TARGET:.0%}: {met} of {len(rows)}")


def row(link: str, name: str, steps: int, real: dict, sim: dict) -> dict[str, Any]:
    real_s, sim_s = real_time(real), float(sim["wall_time_s"])
    return {"link": link, "config": name, "steps_per_worker": steps, "real_s": real_s,
            "real_wall_s": float(real["wall_time_s"]), "simulated_s": sim_s,
            "sim_over_real": sim_s / real_s,
            "within_target": abs(sim_s / real_s - 1) <= TARGET}  # fmt: skip


def format_row(r: dict[str, Any]) -> str:
    return (f"{r['link']:>16} | {r['config']:<22} | real {r['real_s']:.3f} s | simulated "
            f"{r['simulated_s']:.3f} s | ratio {r['sim_over_real']:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
