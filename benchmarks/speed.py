"""A worker against the plain PyTorch loop a user would write instead, measured side by side.

1. Local step rate (no communication) of our worker (EAMSGD role + FlatModel, the runtime's hot
   path) against ``torch.optim.SGD(momentum=0.99, nesterov=True, foreach=True)`` on the same
   model, the same minibatches, one thread: the ~1M-parameter MLP, LeNet and cifar7. The two run
   interleaved, in alternating order, in many short rounds; the figure is the ratio of the two
   best rounds (the least disturbed by other work on a shared machine: interference only ever
   slows a round down), with the median of the per-round ratios beside it (target >= 0.97).
2. End to end: EAMSGD with tau = 10 through the real runtime (gloo, server + 1 worker process,
   with and without overlap) against that same plain loop with no communication at all, run in
   this process before and after each of the runtime's runs; best against best, as above
   (target >= 0.95). Two processes on two cores.
3. Peak memory per parameter (bytes/param) of a worker and of the plain loop, each measured in a
   fresh process over steady-state steps.

    python benchmarks/speed.py                 # full (~4 min of CPU)
    python benchmarks/speed.py --quick         # a few steps of each (< 1 min)
    python benchmarks/speed.py --device cuda   # the same on a GPU (launch/gpu_check.sh)
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import one_thread_cli, suffix, write_csv, write_json  # noqa: E402
from _memory import peak_bytes, reset_peak, rss_bytes  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from easgd.comm.transport import PairTransport  # noqa: E402
from easgd.config.algorithm import AlgorithmConfig  # noqa: E402
from easgd.config.schema import CommConfig, DataConfig, ModelConfig, TrainConfig  # noqa: E402
from easgd.data.sampling import MinibatchSampler  # noqa: E402
from easgd.flat import FlatModel  # noqa: E402
from easgd.models import MLP, Cifar7, LeNet  # noqa: E402
from easgd.parts.build import build_model, build_split  # noqa: E402
from easgd.roles import ElasticWorker, worker_step  # noqa: E402
from easgd.topologies.launch import launch  # noqa: E402

LR, MOMENTUM, BATCH = 0.01, 0.99, 128
TARGET_LOCAL, TARGET_E2E = 0.97, 0.95
# name -> (factory, input shape); cifar7 on 3x32x32 CIFAR-10 images
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp": (lambda: MLP((256,), 10, (1024, 704)), (256,)),
    "lenet": (lambda: LeNet((1, 28, 28), 10), (1, 28, 28)),
    "cifar7": (lambda: Cifar7((3, 32, 32), 10), (3, 32, 32)),
}
E2E_DATA = DataConfig(name="synthetic", num_features=256, num_samples=4000, batch_size=BATCH)
E2E_MODEL = ModelConfig(name="mlp", hidden=[1024, 704])


def minibatches(
    shape: tuple[int, ...], count: int, device: str = "cpu"
) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        (torch.randn(BATCH, *shape, generator=generator).to(device),
         torch.randint(0, 10, (BATCH,), generator=generator).to(device))
        for _ in range(count)
    ]  # fmt: skip


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class PlainLoop:
    """What a user would run instead: torch's Nesterov SGD, foreach."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.optimizer = torch.optim.SGD(
            module.parameters(), lr=LR, momentum=MOMENTUM, nesterov=True, foreach=True
        )

    def step(self, inputs: Tensor, targets: Tensor) -> None:
        self.optimizer.zero_grad()
        F.cross_entropy(self.module(inputs), targets).backward()
        self.optimizer.step()

    def point(self) -> Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.module.parameters()])


class OurWorker:
    """The runtime's worker hot path with no exchange after t = 0: role, FlatModel, device loss."""

    def __init__(self, module: nn.Module) -> None:
        self.flat = FlatModel(module)
        self.role = ElasticWorker(
            self.flat.initial_point(), comm_period=10**9, learning_rate=LR, momentum=MOMENTUM,
            scratch=self.flat.flat_params,
        )  # fmt: skip
        self.loss_sum: float | Tensor = 0.0

    def step(self, inputs: Tensor, targets: Tensor) -> None:
        loss = worker_step(
            self.role, lambda point: self.flat.gradient(point, inputs, targets), lambda _: None
        )
        self.loss_sum = loss + self.loss_sum  # as WorkerLoop does: no host sync per step

    def point(self) -> Tensor:
        # torch's Nesterov SGD keeps the look-ahead y = x + delta v in its parameters
        return self.role.params + MOMENTUM * self.role.velocity


def local_rates(name: str, rounds: int, steps: int, device: str = "cpu") -> dict[str, Any]:
    """Interleaved step rates of the plain loop and our worker on one model."""
    factory, shape = MODELS[name]
    torch.manual_seed(0)
    module = factory()
    twin = factory()
    twin.load_state_dict(module.state_dict())
    module, twin = module.to(device), twin.to(device)
    methods: dict[str, Any] = {"plain": PlainLoop(module), "ours": OurWorker(twin)}
    data = minibatches(shape, 8, device)
    cursor = dict.fromkeys(methods, 0)

    def run(method: str, count: int) -> float:
        synchronize(device)
        started = time.perf_counter()
        for _ in range(count):
            methods[method].step(*data[cursor[method] % len(data)])
            cursor[method] += 1
        synchronize(device)
        return time.perf_counter() - started

    for method in methods:  # warm-up
        run(method, 2)
    ratios, totals = [], dict.fromkeys(methods, 0.0)
    best = dict.fromkeys(methods, float("inf"))
    for r in range(rounds):
        order = ["plain", "ours"] if r % 2 == 0 else ["ours", "plain"]
        seconds = {m: run(m, steps) for m in order}
        for m in methods:
            totals[m] += seconds[m]
            best[m] = min(best[m], seconds[m])
        ratios.append(seconds["plain"] / seconds["ours"])
    params = sum(p.numel() for p in module.parameters())
    plain_point, our_point = methods["plain"].point(), methods["ours"].point()
    drift = float((plain_point - our_point).norm() / plain_point.norm())
    return {
        "model": name, "params": params, "rounds": rounds, "steps_per_round": steps,
        "plain_steps_per_s": steps / best["plain"], "ours_steps_per_s": steps / best["ours"],
        "ratio": best["plain"] / best["ours"], "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios), "ratio_max": max(ratios), "target": TARGET_LOCAL,
        "plain_mean_steps_per_s": rounds * steps / totals["plain"],
        "ours_mean_steps_per_s": rounds * steps / totals["ours"],
        "relative_point_difference": drift,
    }  # fmt: skip


def e2e_rate(steps: int, overlap: bool, device: str = "cpu") -> float:
    """The worker's own step rate in a real EAMSGD run, tau = 10, server + 1 worker."""
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = TrainConfig(
            algorithm=AlgorithmConfig("eamsgd", learning_rate=LR, momentum=MOMENTUM),
            data=E2E_DATA, model=E2E_MODEL, workers=1, steps_per_worker=steps,
            eval_interval_s=3600.0, progress=False, tensorboard=False, run_dir=run_dir,
            comm=CommConfig(period=10, overlap=overlap), device=device,
        )  # fmt: skip
        cfg.checkpoint.every_s = 0.0
        cfg.checkpoint.resume = False
        summary = launch(cfg)
        assert summary is not None
        return float(summary["details"]["worker_steps_per_s"]["1"])


def plain_rate(steps: int, device: str = "cpu") -> float:
    """The plain loop on the end-to-end run's model and data stream, in this process."""
    split = build_split(E2E_DATA)
    model = build_model(E2E_MODEL, split, seed=0).to(device)
    sampler = MinibatchSampler(
        split, batch_size=BATCH, worker_index=0, num_workers=1, seed=0, device=torch.device(device)
    )
    loop = PlainLoop(model)
    for _ in range(3):
        loop.step(*sampler.sample())
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        loop.step(*sampler.sample())
    synchronize(device)
    return steps / (time.perf_counter() - started)


def e2e(rounds: int, steps: int, device: str = "cpu") -> list[dict[str, Any]]:
    """Each round: plain, runtime, plain, runtime with overlap (plain measured next to each)."""
    rows = []
    for overlap in (False, True):
        ratios, ours, plains = [], [], []
        for _ in range(rounds):
            before = plain_rate(steps, device)
            rate = e2e_rate(steps, overlap, device)
            after = plain_rate(steps, device)
            plain = max(before, after)
            ours.append(rate)
            plains.append(plain)
            ratios.append(rate / plain)
        rows.append({
            "run": "eamsgd tau=10 overlap" if overlap else "eamsgd tau=10",
            "processes": 2, "steps": steps, "rounds": rounds,
            "plain_steps_per_s": max(plains), "ours_steps_per_s": max(ours),
            "ratio": max(ours) / max(plains), "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
            "ratio_max": max(ratios), "target": TARGET_E2E,
        })  # fmt: skip
    return rows


def memory_probe(kind: str, steps: int, device: str = "cpu") -> float:
    """Peak bytes per parameter over steady-state steps, in a fresh process (spawned).

    On a GPU: the peak of torch's CUDA allocator instead of the process's resident memory.
    """
    torch.set_num_threads(1)
    factory, shape = MODELS["mlp"]
    data = minibatches(shape, 2, device)
    cuda = device.startswith("cuda")
    for warm in (PlainLoop, OurWorker):  # load every library and kernel first: not per parameter
        tiny = warm(MLP((256,), 10, (8,)).to(device))
        for i in range(2):
            tiny.step(*data[i])
    del tiny
    torch.manual_seed(0)
    baseline = torch.cuda.memory_allocated() if cuda else rss_bytes()
    module = factory().to(device)
    params = sum(p.numel() for p in module.parameters())
    if kind == "plain":
        method: Any = PlainLoop(module)
    else:
        method = OurWorker(module)
        # the worker's transport: one receive buffer; x goes out as it is (contiguous, CPU)
        method.transport = PairTransport(peer=0, group=None, numel=params)
    for i in range(3):
        method.step(*data[i % 2])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak()
    for i in range(steps):
        method.step(*data[i % 2])
    peak = torch.cuda.max_memory_allocated() if cuda else peak_bytes()
    return (peak - baseline) / params


def memory(steps: int, device: str = "cpu", probes: int = 2) -> dict[str, float]:
    """Bytes per parameter of each kind: the least of ``probes`` fresh processes (the allocator's
    slack only ever adds to a resident-memory peak: 26 to 30 bytes were seen for one worker)."""
    context = mp.get_context("spawn")
    result = {}
    with context.Pool(1, maxtasksperchild=1) as pool:
        for kind in ("plain", "worker"):
            result[f"{kind}_bytes_per_param"] = min(
                pool.apply(memory_probe, (kind, steps, device)) for _ in range(probes)
            )
    return result


def plot(local: list[dict[str, Any]], ends: list[dict[str, Any]], path: str) -> None:
    labels = [r["model"] for r in local] + [r["run"].replace("eamsgd ", "e2e ") for r in ends]
    values = [r["ratio"] for r in local + ends]
    lows = [max(0.0, r["ratio"] - r["ratio_min"]) for r in local + ends]
    highs = [max(0.0, r["ratio_max"] - r["ratio"]) for r in local + ends]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    colors = ["tab:blue"] * len(local) + ["tab:orange"] * len(ends)
    ax.bar(labels, values, yerr=[lows, highs], color=colors, capsize=4)
    ax.axhline(TARGET_LOCAL, color="tab:blue", ls="--", lw=1, label=f"local target {TARGET_LOCAL}")
    ax.axhline(
        TARGET_E2E, color="tab:orange", ls=":", lw=1, label=f"end-to-end target {TARGET_E2E}"
    )
    ax.set_ylabel("step rate / plain loop (best rounds)")
    ax.set_ylim(0.5, 1.15)
    ax.set_title("Worker step rate vs torch SGD(nesterov, foreach), 1 thread")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    args = one_thread_cli(__doc__ or "")
    quick, device = args.quick, args.device
    plan = {"mlp": (3, 5), "lenet": (3, 4), "cifar7": (2, 1)} if quick else {
        "mlp": (40, 10), "lenet": (30, 5), "cifar7": (10, 1)
    }  # fmt: skip
    local = [local_rates(name, *plan[name], device) for name in MODELS]
    ends = e2e(1, 40, device) if quick else e2e(3, 300, device)
    mem = memory(3 if quick else 10, device)
    tag = suffix(quick) + ("" if device == "cpu" else "_" + device.replace(":", ""))
    write_csv(args.out / f"speed_local{tag}.csv", local)
    write_csv(args.out / f"speed_e2e{tag}.csv", ends)
    write_json(
        args.out / f"speed{tag}.json",
        {
            "device": device,
            "threads": 1,
            "batch": BATCH,
            "local": local,
            "end_to_end": ends,
            "memory": mem,
        },  # fmt: skip
    )
    plot(local, ends, str(args.out / f"speed{tag}.png"))
    print(
        f"{'run':24s} {'params':>9s} {'plain/s':>8s} {'ours/s':>8s} {'ratio':>6s} {'[min, max]':>14s} target"
    )
    for r in local:
        print(f"{'local ' + r['model']:24s} {r['params']:9d} {r['plain_steps_per_s']:8.2f} "
              f"{r['ours_steps_per_s']:8.2f} {r['ratio']:6.3f} "
              f"[{r['ratio_min']:.3f}, {r['ratio_max']:.3f}] {r['target']}")  # fmt: skip
    for r in ends:
        print(f"{r['run']:24s} {'':9s} {r['plain_steps_per_s']:8.2f} {r['ours_steps_per_s']:8.2f} "
              f"{r['ratio']:6.3f} [{r['ratio_min']:.3f}, {r['ratio_max']:.3f}] {r['target']}")  # fmt: skip
    print("ratio = best round / best round; [min, max] over the rounds' own ratios")
    print("peak memory, MLP: " + ", ".join(f"{k} {v:.1f}" for k, v in mem.items()))


if __name__ == "__main__":
    main()
