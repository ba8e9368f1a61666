"""Chaos: kill -9 a random worker or the server at a random time under torchrun --max-restarts,
then check that the run finished, what it redid, and that its final snapshot conserves
center = initial center + every worker's ledger; plus a soak run whose resident memory is sampled.

    python benchmarks/chaos.py --worker-kills 20 --server-kills 10 --soak-s 0   # kills only
    python benchmarks/chaos.py --worker-kills 0 --server-kills 0 --soak-s 300   # the soak
    python benchmarks/chaos.py --quick                                          # CI: ~30 s
    python benchmarks/chaos.py --membership-s 600   # elastic membership: kills every 15 s, twice
                                                    # the server, and an undisturbed twin run

Kill runs append to benchmarks/results/chaos_runs.jsonl (so the full set can be run in chunks);
the summary (chaos.json / chaos.log) is recomputed from every row there. The kill lands a random
0-1.5 s after the run's first committed snapshot (so it interrupts training, not start-up).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import parser, suffix, write_json  # noqa: E402
from easgd.analysis.audit import conservation_gap, membership_gap  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORKERS = 3
CONSERVATION_TOL = 1e-4  # float32 center vs float64 ledgers, after thousands of exchanges


def rank_pids(agent: int) -> dict[int, int]:
    """{RANK: pid} of the training processes under a torchrun agent (read from /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid != agent:
                continue
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        for item in env:
            if item.startswith(b"RANK="):
                found[int(item[5:])] = int(entry.name)
    return found


def rss_mb(pid: int) -> float:
    """Resident memory of one process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def torchrun(
    run_dir: Path,
    workers: int,
    overrides: list[str],
    restarts: int,
    shards: int = 1,
    *,
    fixed: bool = True,
) -> subprocess.Popen[str]:
    """A torchrun job; ``fixed``: a fixed roster with the ledger audit of its snapshots, else
    elastic membership (whose server keeps the members' ledgers itself)."""
    kept = (
        ["eval_interval_s=0.25", "checkpoint.every_s=0.2", "checkpoint.ledger=true"]
        if fixed
        else ["eval_interval_s=1", "checkpoint.every_s=5", "membership.mode=elastic"]
    )
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={workers + shards}", f"--max-restarts={restarts}", "-m", "easgd.train",
        f"workers={workers}", f"server.shards={shards}", "progress=false", "tensorboard=false",
        *kept, *overrides, f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EASGD_LOG_LEVEL": "WARNING"}
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def kill_run(
    run_dir: Path,
    victim: str,
    steps: int,
    rng: random.Random,
    *,
    delay_s: float = 1.5,
    shards: int = 1,
) -> dict[str, Any]:
    """One run with one kill -9 of a random worker (or the server: a random shard if
    ``shards`` > 1); what came of it."""
    algorithm = rng.choice(["easgd", "eamsgd", "downpour"])
    period = 1 if algorithm == "downpour" and rng.random() < 0.5 else 10
    proc = torchrun(
        run_dir, WORKERS, [f"algorithm={algorithm}", f"comm.period={period}",
                           f"steps_per_worker={steps}"], restarts=1, shards=shards,
    )  # fmt: skip
    committed = run_dir / "checkpoints" / "committed.json"
    deadline = time.time() + 120
    while not committed.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, delay_s))
    rank = (
        rng.randint(0, shards - 1)
        if victim == "server"
        else rng.randint(shards, shards + WORKERS - 1)
    )
    pids = rank_pids(proc.pid)
    killed = proc.poll() is None and rank in pids
    if killed:
        os.kill(pids[rank], signal.SIGKILL)
    try:
        _, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, stderr = proc.communicate()
    row: dict[str, Any] = {"victim": victim, "rank": rank, "algorithm": algorithm, "tau": period,
                           "shards": shards, "killed": killed, "returncode": proc.returncode}  # fmt: skip
    summary_path = run_dir / "summary.json"
    if proc.returncode == 0 and summary_path.exists():
        summary = json.loads(summary_path.read_text())
        gap = conservation_gap(run_dir)
        row.update(
            survived=summary["worker_steps"] == WORKERS * steps,
            restarts=summary["restarts"],
            redone_steps=summary["details"]["redone_worker_steps"],
            resumed_steps=sum(summary["resumed_worker_steps"].values()),
            conservation_gap=gap,
            conservation_held=gap < CONSERVATION_TOL,
            test_error=summary["test_error"],
        )
    else:
        row.update(survived=False, conservation_held=False, error=stderr[-1500:])
    return row


def soak(run_dir: Path, workers: int, seconds: float, every_s: float) -> dict[str, Any]:
    """A long run (max_wall_s) with resident memory of every rank sampled every ``every_s``."""
    proc = torchrun(
        run_dir, workers, ["algorithm=eamsgd", "steps_per_worker=100000000", f"max_wall_s={seconds}",
                           "checkpoint.every_s=5"], restarts=0,
    )  # fmt: skip
    samples: list[dict[str, Any]] = []
    metrics = run_dir / "metrics.csv"
    while proc.poll() is None and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.1)  # start-up (imports, rendezvous) is not part of the soak
    started = time.time()
    while proc.poll() is None:
        pids = rank_pids(proc.pid)
        if len(pids) == workers + 1:
            with contextlib.suppress(OSError):  # a rank that just exited
                samples.append(
                    {"t": time.time() - started, "rss_mb": {r: rss_mb(p) for r, p in pids.items()}}
                )
        time.sleep(every_s)
    _, stderr = proc.communicate()
    summary = json.loads((run_dir / "summary.json").read_text()) if proc.returncode == 0 else {}
    # growth from the first sample after warm-up (a fifth of the run, from the first
    # evaluations on) to the last one
    steady = [s for s in samples if s["t"] >= seconds / 5] or samples
    first, last = steady[0], steady[-1]
    total = lambda s: sum(s["rss_mb"].values())  # noqa: E731
    per_rank = {
        r: (last["rss_mb"][r] - first["rss_mb"][r]) / first["rss_mb"][r] for r in first["rss_mb"]
    }
    return {
        "workers": workers, "seconds": seconds, "returncode": proc.returncode,
        "samples": len(samples), "rss_total_start_mb": total(first), "rss_total_end_mb": total(last),
        "growth_total": (total(last) - total(first)) / total(first),
        "growth_max_rank": max(per_rank.values()), "exchanges": summary.get("exchanges"),
        "worker_steps": summary.get("worker_steps"), "error": stderr[-1500:] if proc.returncode else None,
        "trace": [{"t": round(s["t"], 1), "total_mb": round(total(s), 1)} for s in samples],
    }  # fmt: skip


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def descendants(root: int) -> list[int]:
    """Every live process below ``root``."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parents[int(entry.name)] = parent_of(int(entry.name))
    found, frontier = [], [root]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def keeper_child(keeper: int) -> int | None:
    """The process a keeper runs its rank's part in (not multiprocessing's resource tracker)."""
    for pid in descendants(keeper):
        with contextlib.suppress(OSError):
            if (
                parent_of(pid) == keeper
                and b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
            ):
                return pid
    return None


def membership_run(
    run_dir: Path,
    workers: int,
    seconds: float,
    rng: random.Random,
    *,
    kill_every_s: float,
    server_kills: int,
    period: int,
) -> dict[str, Any]:
    """An elastic-membership run of ``seconds`` (max_wall_s): kill -9 of a random worker every
    ``kill_every_s`` and of the server ``server_kills`` times, evenly spread (no kills when
    ``kill_every_s`` is 0); resident memory of all its processes sampled every 5 s."""
    proc = torchrun(
        run_dir, workers, ["algorithm=eamsgd", f"comm.period={period}",
                           "steps_per_worker=100000000", f"max_wall_s={seconds}"],
        restarts=0, fixed=False,
    )  # fmt: skip
    metrics = run_dir / "metrics.csv"
    while proc.poll() is None and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.1)  # start-up is not part of the schedule
    started = time.time()
    plan: list[tuple[float, str]] = []
    if kill_every_s > 0:
        plan = [
            (t, "worker") for t in range(int(kill_every_s), int(seconds) - 5, int(kill_every_s))
        ]
        server_at = [seconds * (k + 1) / (server_kills + 1) for k in range(server_kills)]
        plan = sorted(plan + [(t + kill_every_s / 2, "server") for t in server_at])
    kills: list[dict[str, Any]] = []
    samples: list[dict[str, float]] = []
    next_sample = 0.0
    while proc.poll() is None:
        now = time.time() - started
        if plan and now >= plan[0][0]:
            _, victim = plan.pop(0)
            rank = 0 if victim == "server" else rng.randint(1, workers)
            keeper = rank_pids(proc.pid).get(rank)
            child = keeper_child(keeper) if keeper is not None else None
            if child is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
                    kills.append({"t": round(now, 2), "victim": victim, "rank": rank})
        if now >= next_sample:
            with contextlib.suppress(OSError):
                total = sum(rss_mb(pid) for pid in [proc.pid, *descendants(proc.pid)])
                samples.append({"t": round(now, 1), "total_mb": round(total, 1)})
            next_sample = now + 5.0
        time.sleep(0.05)
    _, stderr = proc.communicate()
    row: dict[str, Any] = {"returncode": proc.returncode, "seconds": seconds, "workers": workers,
                           "tau": period, "kills": kills, "trace": samples}  # fmt: skip
    if proc.returncode != 0 or not (run_dir / "summary.json").exists():
        row["error"] = stderr[-3000:]
        return row
    summary = json.loads((run_dir / "summary.json").read_text())
    figures = summary["details"]["membership"]
    worker_kills = sum(k["victim"] == "worker" for k in kills)
    redone = summary["details"]["redone_steps_by_worker"]
    row.update(
        job_restarts=0,  # torchrun --max-restarts=0 and the job exited 0
        server_restarts=summary["restarts"],
        worker_kills=worker_kills,
        server_kills=sum(k["victim"] == "server" for k in kills),
        members_left=figures["members_left"],
        members_rejoined=figures["members_rejoined"],
        redone_steps=sum(redone.values()),
        redone_per_worker_kill=sum(redone.values()) / max(1, worker_kills),
        rejoin_s=figures["rejoin_s"],
        worker_steps=summary["worker_steps"],
        exchanges=summary["exchanges"],
        test_error=summary["test_error"],
        ledger_gap=membership_gap(run_dir),
    )
    return row


def steady_memory(row: dict[str, Any]) -> tuple[float, float, float]:
    """(first, last, largest) total resident MB from a fifth of the run to 5 s before its end
    (start-up and shutdown are not the steady state)."""
    seconds = row["seconds"]
    steady = [s["total_mb"] for s in row["trace"] if seconds / 5 <= s["t"] <= seconds - 5]
    return (steady[0], steady[-1], max(steady)) if steady else (0.0, 0.0, 0.0)


def plot_membership(chaos: dict[str, Any], calm: dict[str, Any], path: Path) -> None:
    """Resident memory of every process of the run over time, with the kills marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for row, label in ((chaos, "with kills"), (calm, "undisturbed")):
        trace = row["trace"]
        ax.plot([s["t"] for s in trace], [s["total_mb"] for s in trace], label=label)
    for kill in chaos["kills"]:
        ax.axvline(kill["t"], color="red" if kill["victim"] == "server" else "gray",
                   alpha=0.6 if kill["victim"] == "server" else 0.2, linewidth=1)  # fmt: skip
    ax.set_xlabel("seconds (gray: a worker killed, red: the server killed)")
    ax.set_ylabel("resident memory, all processes (MB)")
    ax.set_title(f"elastic membership, {chaos['workers']} workers, kill -9 every "
                 f"{chaos['seconds'] / max(1, len(chaos['kills'])):.0f} s")  # fmt: skip
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def group(row: dict[str, Any]) -> str:
    """worker / server kills of one-server runs; worker / shard kills of sharded runs."""
    shards = row.get("shards", 1)
    if shards == 1:
        return str(row["victim"])
    return f"{'shard' if row['victim'] == 'server' else 'worker'} (shards={shards})"


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for victim in sorted({group(r) for r in rows}, key=lambda g: (len(g), g)):
        mine = [r for r in rows if group(r) == victim and r["killed"]]
        held = [r for r in mine if r.get("conservation_held")]
        out[victim] = {
            "killed": len(mine),
            "survived": sum(bool(r.get("survived")) for r in mine),
            "conservation_held": len(held),
            "redone_steps_mean": sum(r.get("redone_steps", 0) for r in mine) / max(1, len(mine)),
            "redone_steps_max": max((r.get("redone_steps", 0) for r in mine), default=0),
            "max_conservation_gap": max(
                (r.get("conservation_gap", 0.0) for r in mine), default=0.0
            ),
            "not_killed_in_time": sum(1 for r in rows if group(r) == victim and not r["killed"]),
        }
    return out


def plot_soak(soak: dict[str, Any], path: Path) -> None:
    """Resident memory of all ranks together over the soak run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    trace = soak["trace"]
    ax.plot([s["t"] for s in trace], [s["total_mb"] for s in trace], "o-", markersize=3)
    ax.axvline(soak["seconds"] / 5, color="gray", linestyle=":", label="growth measured from here")
    ax.set_xlabel("seconds into the soak")
    ax.set_ylabel(f"resident memory, {soak['workers']} workers + server (MB)")
    ax.set_title(f"soak: {100 * soak['growth_total']:+.2f}% from warm-up to end")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--worker-kills", type=int, default=20)
    p.add_argument("--server-kills", type=int, default=10)
    p.add_argument("--soak-s", type=float, default=600.0)
    p.add_argument("--soak-workers", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--shards",
        type=int,
        default=1,
        help="server.shards for the kill runs (server kills hit a random shard)",
    )
    p.add_argument("--scratch", type=Path, default=Path("/tmp/easgd-chaos"))
    p.add_argument(
        "--membership-s",
        type=float,
        default=0.0,
        help="seconds of the elastic-membership run (and of its undisturbed twin); 0: none",
    )
    p.add_argument("--membership-workers", type=int, default=4)
    p.add_argument("--kill-every-s", type=float, default=15.0)
    p.add_argument("--membership-server-kills", type=int, default=2)
    p.add_argument(
        "--membership-report",
        action="store_true",
        help="print the membership figures again from the saved chaos_membership.json",
    )
    args = p.parse_args()
    if args.membership_s > 0 or args.membership_report:
        membership_main(args)
        return
    if args.quick:
        args.worker_kills, args.server_kills, args.soak_s, args.soak_workers = 1, 0, 6.0, 2
    rng = random.Random(args.seed + int(time.time()))
    steps = 800 if args.quick else 2000
    tag = suffix(args.quick)
    runs_file = args.out / f"chaos_runs{tag}.jsonl"
    if args.quick:
        runs_file.unlink(missing_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    plan = ["worker"] * args.worker_kills + ["server"] * args.server_kills
    rng.shuffle(plan)
    for index, victim in enumerate(plan):
        run_dir = args.scratch / f"run{time.time_ns()}"
        row = kill_run(
            run_dir, victim, steps, rng, delay_s=0.3 if args.quick else 1.5, shards=args.shards
        )
        with open(runs_file, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(f"[{index + 1}/{len(plan)}] kill {victim} (rank {row['rank']}, {row['algorithm']}): "
              f"survived={row.get('survived')} redone={row.get('redone_steps')} "
              f"gap={row.get('conservation_gap')}", flush=True)  # fmt: skip
    rows = (
        [json.loads(line) for line in runs_file.read_text().splitlines()]
        if runs_file.exists()
        else []
    )
    result_file = args.out / f"chaos{tag}.json"
    previous = json.loads(result_file.read_text()) if result_file.exists() else {}
    result: dict[str, Any] = {
        "kills": summarise(rows),
        "runs": len(rows),
        "soak": previous.get("soak"),
    }
    if args.soak_s > 0:
        result["soak"] = soak(
            args.scratch / f"soak{time.time_ns()}",
            args.soak_workers,
            args.soak_s,
            2.0 if args.quick else 10.0,
        )
    write_json(result_file, result)
    if result["soak"] and result["soak"]["trace"]:
        plot_soak(result["soak"], args.out / f"chaos_soak{tag}.png")
    lines = []
    for victim, figures in result["kills"].items():
        lines.append(
            f"{victim} kills: survived {figures['survived']}/{figures['killed']}, conservation held "
            f"{figures['conservation_held']}/{figures['killed']} (max gap {figures['max_conservation_gap']:.2e}), "
            f"redone steps mean {figures['redone_steps_mean']:.0f} max {figures['redone_steps_max']}"
        )
    if result["soak"]:
        s = result["soak"]
        lines.append(
            f"soak: {s['workers']} workers, {s['seconds']:.0f} s, rc={s['returncode']}, resident memory "
            f"{s['rss_total_start_mb']:.0f} -> {s['rss_total_end_mb']:.0f} MB "
            f"({100 * s['growth_total']:+.2f}% total, {100 * s['growth_max_rank']:+.2f}% worst rank)"
        )
    print_and_save(lines, args.out / f"chaos{tag}.log")


def membership_main(args: Any) -> None:
    """The elastic-membership run with kills and its undisturbed twin, side by side."""
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    tag = suffix(args.quick)
    common = {"kill_every_s": args.kill_every_s, "server_kills": args.membership_server_kills,
              "period": 10}  # fmt: skip
    saved = args.out / f"chaos_membership{tag}.json"
    if args.membership_report:  # the figures again, from the saved runs
        runs = json.loads(saved.read_text())
        chaos, calm = runs["chaos"], runs["undisturbed"]
    else:
        chaos = membership_run(args.scratch / f"members{time.time_ns()}",
                               args.membership_workers, args.membership_s, rng, **common)  # fmt: skip
        common["kill_every_s"] = 0.0
        calm = membership_run(args.scratch / f"calm{time.time_ns()}", args.membership_workers,
                              args.membership_s, rng, **common)  # fmt: skip
        write_json(saved, {"chaos": chaos, "undisturbed": calm})
    if chaos.get("trace") and calm.get("trace"):
        plot_membership(chaos, calm, args.out / f"chaos_membership{tag}.png")
    lines = []
    for name, row in (("with kills", chaos), ("undisturbed", calm)):
        if "error" in row:
            lines.append(f"{name}: FAILED rc={row['returncode']}\n{row['error']}")
            continue
        rejoin = row["rejoin_s"]
        first, last, peak = steady_memory(row)
        lines.append(
            f"{name}: rc={row['returncode']} job restarts={row['job_restarts']} "
            f"worker kills={row['worker_kills']} server kills={row['server_kills']} "
            f"server restarts={row['server_restarts']} members left={row['members_left']} "
            f"rejoined after a server loss={row['members_rejoined']} "
            f"redone steps={row['redone_steps']} ({row['redone_per_worker_kill']:.2f} per worker "
            f"kill, tau={row['tau']}) rejoin s mean="
            f"{sum(rejoin) / max(1, len(rejoin)):.2f} max={max(rejoin, default=0):.2f} "
            f"worker steps={row['worker_steps']} test error={row['test_error']:.4f} "
            f"ledger gap={row['ledger_gap']:.2e} resident memory (all processes, steady) "
            f"{first:.0f} -> {last:.0f} MB, at most {peak:.0f} MB"
        )
    print_and_save(lines, args.out / f"chaos_membership{tag}.log")


def print_and_save(lines: list[str], path: Path) -> None:
    """Print the figures and keep them in ``path``."""
    text = "\n".join(lines)
    print(text)
    path.write_text(text + "\n")


if __name__ == "__main__":
    main()
