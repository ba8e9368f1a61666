"""Typed schemas of every config group and of the whole run, registered in Hydra's ConfigStore.

Each field has a docstring; ``__post_init__`` checks values, naming the key and what is allowed.
OmegaConf type-checks overrides against these dataclasses at composition (a wrong key or type
fails there); :func:`validate` instantiates them so the range checks run before any process starts.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from easgd.algorithms.schedules import SCHEDULES, LearningRateSchedule
from easgd.comm.compression import check_format as check_compression
from easgd.config.algorithm import AlgorithmConfig

BACKENDS = ("auto", "gloo", "nccl")
DATASETS = ("digits", "mnist1d", "synthetic", "mnist", "cifar10", "custom")
MODELS = ("mlp", "lenet", "cifar7", "cnn1d", "custom")
SAMPLING = ("whole", "shard")
DEVICES = ("auto", "cpu", "cuda")
FAILURE_POLICIES = ("fail_fast", "continue")
MODES = ("distributed", "simulate")
TOPOLOGIES = ("server", "allreduce")
FAULT_KINDS = ("kill", "raise", "hang", "nan")
BATCHED_MODES = ("auto", "true", "false")


def check_batched(value: object, key: str = "sim.batched") -> str:
    """``value`` as one of :data:`BATCHED_MODES` (booleans and any case accepted: Hydra reads
    ``sim.batched=true`` as a boolean), or a ValueError naming ``key`` and the allowed values."""
    text = str(value).strip().lower()
    if text not in BATCHED_MODES:
        raise ValueError(f"{key}={value!r}; allowed: {', '.join(BATCHED_MODES)}")
    return text


@dataclass
class CommConfig:
    """How workers talk to the server (comm/ group): period, backend, injected delay."""

    period: int = 10
    """tau: local steps between a worker's exchanges (it exchanges when t_i % period == 0)."""
    backend: str = "auto"
    """auto (gloo; CUDA workers stage through pinned CPU buffers), gloo, or nccl (not yet offered)."""
    latency_ms: float = 0.0
    """Injected delay added before every message is sent, in milliseconds."""
    jitter_ms: float = 0.0
    """Extra random delay per message, uniform in [0, jitter_ms] (seeded per worker)."""
    overlap: bool = False
    """Run elastic exchanges in a background thread while the worker keeps stepping (easgd/eamsgd)."""
    slowdown: list[float] = field(default_factory=list)
    """Per-worker slowdown factors (a worker with 3.0 takes 3x as long per step); empty: none."""
    timeout_s: float = 120.0
    """Timeout of process-group set-up, of a worker's wait for the server's reply, and the
    liveness allowance of a worker's first (warm-up) step. The server's wait for a worker's next
    message has no fixed timeout: the worker's liveness decides (heartbeat_timeout_s)."""
    heartbeat_timeout_s: float = 10.0
    """The server declares a worker hung when its training loop has not advanced for this long,
    or for 10x its own measured time per step if that is longer (a slow worker is not hung)."""
    compression: str = "none"
    """Wire format of exchanged differences: none (float32), bf16, fp16 or int8 (one scale per
    256 values); see easgd.comm.compression and easgd.roles.links for what is quantized."""
    error_feedback: bool = True
    """With compression: carry each increment's rounding (true minus decoded) into the next one."""

    def __post_init__(self) -> None:
        if isinstance(self.period, bool) or int(self.period) != self.period or self.period < 1:
            raise ValueError(f"comm.period must be an integer >= 1, got {self.period!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"comm.backend={self.backend!r}; allowed: {', '.join(BACKENDS)}")
        if self.latency_ms < 0 or self.jitter_ms < 0:
            raise ValueError("comm.latency_ms and comm.jitter_ms must be >= 0")
        if any(factor < 1.0 for factor in self.slowdown):
            raise ValueError(f"comm.slowdown factors must be >= 1, got {list(self.slowdown)!r}")
        if self.timeout_s <= 0 or self.heartbeat_timeout_s <= 0:
            raise ValueError("comm.timeout_s and comm.heartbeat_timeout_s must be > 0")
        check_compression(self.compression)
        if not isinstance(self.error_feedback, bool):
            raise ValueError(
                f"comm.error_feedback must be true or false, got {self.error_feedback!r}"
            )


@dataclass
class DataConfig:
    """Which dataset, how it is read and sampled (data/ group)."""

    name: str = "digits"
    """digits or mnist1d (built in, offline), synthetic, mnist, cifar10 (local files), or custom."""
    root: str | None = None
    """Folder holding the dataset's standard files (mnist: IDX files; cifar10: python batches)."""
    batch_size: int = 128
    """Minibatch size of every worker (paper: 128)."""
    test_fraction: float = 0.2
    """Share of digits/synthetic examples held out for testing (split fixed by data.split_seed)."""
    split_seed: int = 0
    """Seed of the train/test split of digits and synthetic."""
    sampling: str = "whole"
    """whole: each worker samples the whole training set with its own seed (paper); shard: disjoint."""
    num_samples: int = 4000
    """synthetic: number of examples (mnist1d always generates its standard 5,000)."""
    train_subset: int | None = None
    """Keep only the first n training examples (the overfitting regime); null: all of them."""
    num_features: int = 32
    """synthetic: input dimension."""
    num_classes: int = 10
    """synthetic: number of classes."""
    teacher_hidden: int = 64
    """synthetic: hidden width of the random teacher network that labels the inputs."""
    target: str | None = None
    """custom: import path of a callable returning (train_dataset, test_dataset) of torch Datasets."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """custom: keyword arguments passed to ``target``."""

    def __post_init__(self) -> None:
        if self.name not in DATASETS:
            raise ValueError(f"data.name={self.name!r}; allowed: {', '.join(DATASETS)}")
        if self.name in ("mnist", "cifar10") and not self.root:
            raise ValueError(
                f"data.root must name the folder with the {self.name} files "
                f"(e.g. data.root=/path/to/{self.name}); nothing is downloaded"
            )
        if self.name == "custom" and not self.target:
            raise ValueError(
                "data.target must be set for data.name=custom (a module.function path)"
            )
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {self.batch_size!r}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"data.test_fraction must be in (0, 1), got {self.test_fraction!r}")
        if self.sampling not in SAMPLING:
            raise ValueError(f"data.sampling={self.sampling!r}; allowed: {', '.join(SAMPLING)}")
        if self.train_subset is not None and self.train_subset < 1:
            raise ValueError(f"data.train_subset must be >= 1 or null, got {self.train_subset!r}")
        if min(self.num_samples, self.num_features, self.num_classes, self.teacher_hidden) < 1:
            raise ValueError(
                "data.num_samples, num_features, num_classes, teacher_hidden must be >= 1"
            )


@dataclass
class ModelConfig:
    """Which network (model/ group)."""

    name: str = "mlp"
    """mlp, lenet (LeNet-style CNN), cifar7 (the paper's 7-layer CIFAR-10 network), cnn1d (a
    small 1-D CNN for MNIST-1D), or custom."""
    hidden: list[int] = field(default_factory=lambda: [128])
    """mlp: hidden layer widths."""
    channels: int = 25
    """cnn1d: channels of each of its three convolutions."""
    target: str | None = None
    """custom: import path of an nn.Module class or factory, called with input_shape, num_classes."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """custom: extra keyword arguments for ``target``."""

    def __post_init__(self) -> None:
        if self.name not in MODELS:
            raise ValueError(f"model.name={self.name!r}; allowed: {', '.join(MODELS)}")
        if self.name == "custom" and not self.target:
            raise ValueError("model.target must be set for model.name=custom")
        if self.channels < 1:
            raise ValueError(f"model.channels must be >= 1, got {self.channels!r}")
        if any(width < 1 for width in self.hidden):
            raise ValueError(f"model.hidden widths must be >= 1, got {list(self.hidden)!r}")


@dataclass
class CheckpointConfig:
    """When and what to checkpoint."""

    every_s: float = 30.0
    """Seconds between consistent snapshots of the server and all workers (0: only at the end)."""
    keep: int = 3
    """How many committed snapshots to keep."""
    resume: bool = True
    """Resume from the newest committed snapshot in the run directory, if there is one."""
    ledger: bool = False
    """Workers keep the sum of the center changes their exchanges caused (float64) in their
    snapshots, so that benchmarks/chaos.py can audit conservation (easgd/eamsgd/downpour)."""

    def __post_init__(self) -> None:
        if self.every_s < 0 or self.keep < 1:
            raise ValueError("checkpoint.every_s must be >= 0 and checkpoint.keep >= 1")


@dataclass
class ServerConfig:
    """Where the center lives in topology=server (server/ keys)."""

    shards: int = 1
    """k: server ranks 0..k-1, each holding a contiguous slice of the center and serving every
    worker's exchange of that slice; a worker talks to the k shards in parallel. 1: one server."""

    def __post_init__(self) -> None:
        if isinstance(self.shards, bool) or int(self.shards) != self.shards or self.shards < 1:
            raise ValueError(f"server.shards must be an integer >= 1, got {self.shards!r}")


MEMBERSHIP_MODES = ("auto", "fixed", "elastic")


@dataclass
class MembershipConfig:
    """Who the server serves (membership/ keys; topology=server with one server).

    fixed: the p workers of the launch; a dead process ends the job (torchrun --max-restarts
    restarts every process from the newest consistent snapshot). elastic: p worker slots; each
    launched process keeps its slot's worker in a child process and starts a new one when it
    dies, which rejoins the running server from the center (docs/reliability.md). auto (the
    default): elastic where it is served, fixed elsewhere (:func:`membership_mode`).
    """

    mode: str = "auto"
    """auto, fixed or elastic. auto is elastic for one parameter server (topology=server,
    server.shards=1, mode=distributed) launched with torchrun's shared store, without
    checkpoint.ledger and without fault.* drills, fixed for every other run."""
    max_respawns: int = 100
    """elastic: how many times a process starts its slot's worker (or the server) again before
    it gives up and exits with the failure (then torchrun's own restart policy applies)."""
    slot_wait_s: float = 120.0
    """elastic: how long the server keeps an empty slot open for a new member; after that the run
    goes on without it."""
    open_slots: int = 0
    """elastic, the server's launch: how many of the p worker slots this launch leaves to workers
    that join from other nodes (``membership.join``); it then has p - open_slots worker
    processes besides the server (slots 1 .. p - open_slots), and the open slots are the last."""
    join: str | None = None
    """HOST:PORT of a running elastic run's rendezvous store (its first node's ``torchrun
    --rdzv-endpoint``): this launch runs no server, and each of its processes is a worker that
    claims one of that run's open slots (``membership.open_slots``), so whole nodes join and leave
    the running server (null: this launch is the run)."""
    join_id: str = "none"
    """With ``join``: that run's ``torchrun --rdzv-id`` (torchrun's default: none)."""

    def __post_init__(self) -> None:
        if isinstance(self.open_slots, bool) or self.open_slots < 0:
            raise ValueError(f"membership.open_slots must be >= 0, got {self.open_slots!r}")
        if self.join is not None:
            host, _, port = str(self.join).rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(
                    f"membership.join={self.join!r}: give HOST:PORT of the first node's "
                    "rendezvous endpoint (torchrun --rdzv-endpoint), e.g. node0:29400"
                )
        if self.join is not None and self.open_slots:
            raise ValueError(
                "membership.open_slots is the server's launch's (the slots it leaves open); a "
                "launch with membership.join fills them: set open_slots=0 here"
            )
        if self.mode == "fixed" and (self.join is not None or self.open_slots):
            key = "membership.join" if self.join is not None else "membership.open_slots"
            raise ValueError(
                f"{key} is for nodes that join a running elastic run; it needs "
                "membership.mode=elastic or auto, not fixed"
            )
        if self.mode not in MEMBERSHIP_MODES:
            raise ValueError(
                f"membership.mode={self.mode!r}; allowed: {', '.join(MEMBERSHIP_MODES)}"
            )
        if isinstance(self.max_respawns, bool) or self.max_respawns < 0:
            raise ValueError(f"membership.max_respawns must be >= 0, got {self.max_respawns!r}")
        if not self.slot_wait_s > 0:
            raise ValueError(f"membership.slot_wait_s must be > 0, got {self.slot_wait_s!r}")


@dataclass
class FaultConfig:
    """Failure injection for chaos tests and drills (fault/ keys; all off by default).

    A rank is a process rank of the run: with a server, ranks 0..k-1 are the server (shards) and
    k..k+p-1 the workers; with topology=allreduce ranks 0..p-1 are all workers; a sequential
    baseline is rank 0. A worker's fault fires after its local step ``*_at_step`` (1 to
    steps_per_worker). Kills, exceptions and hangs fire only in the first attempt of a torchrun
    job, so a restart succeeds. What a topology cannot inject (see :func:`_check_faults`: a hung
    or NaN server, a raising shard, a hang or NaN with no peer to notice, anything in
    mode=simulate) is refused before any process starts.
    """

    kill_rank: int | None = None
    """This rank sends itself SIGKILL ..."""
    kill_at_step: int = 0
    """... when its local step counter reaches this value (a server rank: server updates)."""
    kill_after_commit: bool = False
    """With ``kill_rank``: from ``kill_at_step`` on, the kill waits until the run has a committed
    snapshot, so a restart resumes from one whatever the machine's pace (resume drills, tests)."""
    raise_rank: int | None = None
    """This rank raises a RuntimeError (0: the single server, inside its exchange handling) ..."""
    raise_at_step: int = 0
    """... at this local step (rank 0: once it has made this many updates)."""
    hang_rank: int | None = None
    """This worker hangs (hang_mode) ..."""
    hang_at_step: int = 0
    """... at this local step (detected by the server's heartbeat monitor; under all-reduce the
    other ranks' collective fails after comm.timeout_s)."""
    hang_mode: str = "sigstop"
    """sigstop: the whole process stops (its connections stay open); loop: only its training loop
    blocks (a stuck step), while its other threads run on."""
    nan_rank: int | None = None
    """This worker's parameters become NaN ..."""
    nan_at_step: int = 0
    """... at this local step (a server refuses them and resets the worker; under all-reduce the
    center turns non-finite and every rank stops with an error naming the rank)."""

    def armed(self) -> dict[str, int]:
        """{kind: rank} of the faults that are set (kind: kill, raise, hang or nan)."""
        ranks = {kind: getattr(self, f"{kind}_rank") for kind in FAULT_KINDS}
        return {kind: rank for kind, rank in ranks.items() if rank is not None}

    def __post_init__(self) -> None:
        if self.hang_mode not in ("sigstop", "loop"):
            raise ValueError(f"fault.hang_mode={self.hang_mode!r}; allowed: sigstop, loop")


@dataclass
class CostConfig:
    """What an exchange costs on the simulator's virtual clock (cost/ group; mode=simulate only).

    An exchange costs latency + bytes / bandwidth each way plus the server's service time, and the
    server serves one exchange at a time (easgd/sim/cost.py). Times are turned into steps by
    dividing by the model's step time. Null figures are measured on this machine (cached).
    """

    name: str = "zero"
    """The profile's name (measured, zero, or a cluster profile of configs/cost/)."""
    measure_network: bool = False
    """Measure latency and bandwidth here: a real 2-process gloo exchange of the model's size."""
    latency_us: float = 0.0
    """One-way latency of one message, microseconds (ignored when measure_network)."""
    bandwidth_gbps: float | None = None
    """Link bandwidth in gigabits per second; null: infinite (ignored when measure_network)."""
    service_us: float | None = 0.0
    """The server's time to handle one exchange, microseconds; null: time the server role here."""
    step_time_s: float | None = None
    """Seconds per local step of the model (the unit of the virtual clock); null: measured here.
    A profile of a cluster states its accelerator's step time here."""
    charged_params: int | None = None
    """Parameters each message is charged for (bytes = 4 per parameter + header); null: the
    simulated model's own. With ``step_time_s`` this prices, say, a 25M-parameter model's
    exchanges on 10 GbE while the gradient math stays on the small simulated model; a service
    time left null is then timed for the server rule on this many values."""
    source: str = ""
    """Where the profile's numbers come from."""

    def __post_init__(self) -> None:
        if self.latency_us < 0:
            raise ValueError(f"cost.latency_us must be >= 0, got {self.latency_us!r}")
        if self.bandwidth_gbps is not None and self.bandwidth_gbps <= 0:
            raise ValueError(
                f"cost.bandwidth_gbps must be > 0 or null (infinite), got {self.bandwidth_gbps!r}"
            )
        if self.service_us is not None and self.service_us < 0:
            raise ValueError(f"cost.service_us must be >= 0 or null, got {self.service_us!r}")
        if self.step_time_s is not None and self.step_time_s <= 0:
            raise ValueError(f"cost.step_time_s must be > 0 or null, got {self.step_time_s!r}")
        if self.charged_params is not None:
            _check_int("cost.charged_params", self.charged_params, low=1, null=True)


@dataclass
class SimulateConfig:
    """How ``mode=simulate`` computes (sim.* keys); what it simulates is set by the other groups
    (workers, comm.*, cost/). See easgd/sim/simulator.py and easgd/sim/batched.py."""

    batched: str = "auto"
    """Take the gradient steps of many workers in one batched call (torch.func.vmap): auto (when
    the model allows it, no BatchNorm buffers and no dropout, with more than one worker, and it is
    expected to be faster: not for a convolutional model on a CPU, where it measured 0.7x), true
    (an error when it cannot), false (one gradient call per worker step, as before). The two paths
    agree to float rounding (bit for bit for a model whose batched kernels sum in the same order);
    the schedule, stragglers and cost clock are the same. Ignored with mode=distributed."""

    def __post_init__(self) -> None:
        self.batched = check_batched(self.batched)


PRECISIONS = ("fp32", "bf16")


@dataclass
class OptimConfig:
    """How each worker takes its local step, beyond the algorithm's rule (optim.* keys).

    Equations and what each key does to the EASGD math: easgd/algorithms/schedules.py (eta_t at
    the worker's own step t_i; the moving rate alpha stays constant), easgd/algorithms/clipping.py
    (after weight decay) and easgd/models/step.py (bf16, torch.compile). All off by default.
    """

    lr_schedule: str = "constant"
    """eta_t: constant, cosine, step, or power (the EASGD authors' eta / (1 + t lrd)^lrp); t is
    the worker's local step t_i. Not for mdownpour (its gradient step is the server's)."""
    warmup_steps: int = 0
    """W: linear warm-up eta (t + 1) / W over the first W local steps, before any schedule."""
    decay_steps: int | None = None
    """cosine: steps from the end of the warm-up to the floor; null: steps_per_worker - W."""
    min_lr_ratio: float = 0.0
    """cosine: the floor, as a fraction of eta, in [0, 1]."""
    step_every: int = 1000
    """step: multiply eta by step_factor every this many local steps (after the warm-up)."""
    step_factor: float = 0.1
    """step: gamma in (0, 1]."""
    decay_rate: float = 0.0
    """power: lrd >= 0, the authors' learning-rate decay per local step (0: no decay)."""
    decay_power: float = 1.0
    """power: lrp >= 0, the authors' exponent (1: Torch7's learningRateDecay)."""
    clip_grad_norm: float | None = None
    """Clip every local gradient (weight decay included) to this global 2-norm; null: never."""
    precision: str = "fp32"
    """fp32, or bf16: the workers' forward and backward under CUDA bf16 autocast (CUDA only);
    parameters, velocities, the center and every update stay float32."""
    compile: bool = False
    """torch.compile the model's training forward on each worker (evaluation stays eager)."""

    def __post_init__(self) -> None:
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(
                f"optim.lr_schedule={self.lr_schedule!r}; allowed: {', '.join(SCHEDULES)}"
            )
        _check_int("optim.warmup_steps", self.warmup_steps, low=0)
        if self.decay_steps is not None:
            _check_int("optim.decay_steps", self.decay_steps, low=1, null=True)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio={self.min_lr_ratio!r}; allowed: [0, 1]")
        _check_int("optim.step_every", self.step_every, low=1)
        if not 0.0 < self.step_factor <= 1.0:
            raise ValueError(f"optim.step_factor={self.step_factor!r}; allowed: (0, 1]")
        for key, value in (("decay_rate", self.decay_rate), ("decay_power", self.decay_power)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"optim.{key}={value!r}; allowed: a finite number >= 0")
        if self.clip_grad_norm is not None and not (
            math.isfinite(self.clip_grad_norm) and self.clip_grad_norm > 0
        ):
            raise ValueError(
                f"optim.clip_grad_norm={self.clip_grad_norm!r}; allowed: a finite number > 0, "
                "or null (no clipping)"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"optim.precision={self.precision!r}; allowed: {', '.join(PRECISIONS)}"
            )

    def schedule(self, steps_per_worker: int) -> LearningRateSchedule | None:
        """The learning-rate schedule of a worker that takes ``steps_per_worker`` local steps
        (None: the constant eta, exactly as without a schedule)."""
        if self.lr_schedule == "constant" and self.warmup_steps == 0:
            return None
        options = {
            "constant": {},
            "cosine": {
                "decay_steps": self.decay_steps or max(1, steps_per_worker - self.warmup_steps),
                "final_ratio": self.min_lr_ratio,
            },
            "step": {"every": self.step_every, "factor": self.step_factor},
            "power": {"decay_rate": self.decay_rate, "decay_power": self.decay_power},
        }[self.lr_schedule]
        return LearningRateSchedule(self.lr_schedule, self.warmup_steps, options)


def _check_int(key: str, value: object, *, low: int, null: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        allowed = f"an integer >= {low}" + (", or null" if null else "")
        raise ValueError(f"{key}={value!r}; allowed: {allowed}")


def _check_optim(cfg: TrainConfig) -> None:
    """The optim.* values that this run's algorithm, device or mode cannot honour."""
    optim = cfg.optim
    if optim.schedule(cfg.steps_per_worker) is not None and cfg.algorithm.spec.server_momentum:
        raise ValueError(
            f"optim.lr_schedule={optim.lr_schedule!r} (warmup_steps={optim.warmup_steps}) acts on "
            f"a worker's local step, and {cfg.algorithm.name}'s gradient step is the server's; "
            "use optim.lr_schedule=constant optim.warmup_steps=0"
        )
    cosine = optim.lr_schedule == "cosine" and optim.decay_steps is None
    if cosine and cfg.steps_per_worker <= optim.warmup_steps:
        raise ValueError(
            f"optim.warmup_steps={optim.warmup_steps} leaves no step of steps_per_worker="
            f"{cfg.steps_per_worker} for the cosine decay; lower it or set optim.decay_steps"
        )
    if optim.precision == "bf16":
        if cfg.mode == "simulate" or cfg.device == "cpu":
            where = "mode=simulate (CPU)" if cfg.mode == "simulate" else "device=cpu"
            raise ValueError(
                f"optim.precision=bf16 is CUDA autocast and {where} runs on the CPU; "
                "use optim.precision=fp32, or device=cuda with mode=distributed"
            )
        import torch

        if not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
            raise ValueError(
                f"optim.precision=bf16 needs a CUDA GPU with bf16 and device={cfg.device} finds "
                "none here; use optim.precision=fp32"
            )


@dataclass
class TrainConfig:
    """One training run: p workers and a server (or one process for the sequential baselines)."""

    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    cost: CostConfig = field(default_factory=CostConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sim: SimulateConfig = field(default_factory=SimulateConfig)
    mode: str = "distributed"
    """distributed: real processes, wall-clock time; simulate: one process on the simulator's
    virtual clock with the cost/ profile's communication costs (the same outputs)."""
    server: ServerConfig = field(default_factory=ServerConfig)
    membership: MembershipConfig = field(default_factory=MembershipConfig)
    topology: str = "server"
    """server: parameter-server rank(s) and p workers, asynchronous (the paper's design);
    allreduce: synchronous EASGD/EAMSGD with a replicated center, no server, p processes."""
    workers: int = 4
    """p: worker processes (torchrun starts workers + 1 processes; rank 0 is the server)."""
    steps_per_worker: int = 1000
    """Local steps each worker takes (stop condition)."""
    max_wall_s: float | None = None
    """Stop when this many seconds have passed since training started (null: no limit)."""
    target_test_error: float | None = None
    """Stop once the evaluated variable's test error is at most this (null: never)."""
    eval_interval_s: float | None = None
    """Seconds between evaluations of the center (or z) on the test set (virtual seconds with
    mode=simulate); null: 1 s, or with mode=simulate every 1/50 of the run's total worker steps
    (easgd.parts.assembly.eval_every), so that a simulated run's curve has points."""
    eval_interval_steps: int | None = None
    """Total worker steps (summed over every worker: metrics.csv's worker_steps) between
    evaluations; replaces eval_interval_s when set. A server evaluates at the first check (about
    every 0.1 s) at or past each multiple, all-reduce at the first exchange past it; the
    simulator and a sequential baseline exactly at it."""
    seed: int = 0
    """Seeds the initial weights (identical on every rank) and each worker's minibatches."""
    device: str = "auto"
    """auto (CUDA if available, else CPU), cpu or cuda for the workers; the server stays on CPU."""
    threads: int = 1
    """Intra-op threads per process (oversubscribing cores slows every process down)."""
    max_update_norm: float | None = None
    """Divergence guard: the server also refuses an update (elastic move, push or server step)
    whose norm exceeds this, resetting that worker to the center (non-finite ones always)."""
    worker_failure: str = "fail_fast"
    """fail_fast: a failed worker stops the run; continue: the server goes on with the others."""
    progress: bool = True
    """Show a progress bar on the server's console when it is a terminal (false: never; a batch
    log or pipe never gets one, easgd/parts/progress.py)."""
    tensorboard: bool = True
    """Write TensorBoard event files into the run directory."""
    run_dir: str = "."
    """Where summary.json, metrics.csv, checkpoints and TensorBoard files go (Hydra sets it)."""
    resume: str = "none"
    """none: a fresh run folder; latest: resume the run runs/latest points to; or a run folder
    (runs/<name>) to resume. A finished run is never resumed or overwritten."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}; allowed: {', '.join(MODES)}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers!r}")
        if self.steps_per_worker < 1:
            raise ValueError(f"steps_per_worker must be >= 1, got {self.steps_per_worker!r}")
        if self.max_wall_s is not None and self.max_wall_s <= 0:
            raise ValueError(f"max_wall_s must be > 0 or null, got {self.max_wall_s!r}")
        if self.target_test_error is not None and not 0 <= self.target_test_error <= 1:
            raise ValueError(f"target_test_error must be in [0, 1], got {self.target_test_error!r}")
        if self.eval_interval_s is not None and not self.eval_interval_s > 0:
            raise ValueError(f"eval_interval_s must be > 0 or null, got {self.eval_interval_s!r}")
        if self.eval_interval_steps is not None and (
            isinstance(self.eval_interval_steps, bool) or self.eval_interval_steps < 1
        ):
            raise ValueError(
                f"eval_interval_steps must be an integer >= 1 (total worker steps) or null, "
                f"got {self.eval_interval_steps!r}"
            )
        if self.device not in DEVICES:
            raise ValueError(f"device={self.device!r}; allowed: {', '.join(DEVICES)}")
        if self.max_update_norm is not None and self.max_update_norm <= 0:
            raise ValueError(f"max_update_norm must be > 0 or null, got {self.max_update_norm!r}")
        if not isinstance(self.resume, str) or not self.resume.strip():
            raise ValueError("resume must be none, latest or a run folder (runs/<name>)")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads!r}")
        if self.worker_failure not in FAILURE_POLICIES:
            raise ValueError(
                f"worker_failure={self.worker_failure!r}; allowed: {', '.join(FAILURE_POLICIES)}"
            )
        if self.comm.slowdown and len(self.comm.slowdown) != self.workers:
            raise ValueError(
                f"comm.slowdown has {len(self.comm.slowdown)} factors for {self.workers} workers; "
                "give one per worker or none"
            )
        if self.algorithm.uses_server:
            self.algorithm.resolved_moving_rate(self.workers)
        self.algorithm.spec.check_comm_period(self.comm.period)
        self.algorithm.spec.check_overlap(self.comm.overlap)
        _check_topology(self)
        _check_membership(self)
        _check_faults(self)
        _check_compression(self)
        _check_optim(self)
        if self.comm.backend == "nccl":
            import torch

            if not torch.cuda.is_available():
                raise ValueError(
                    "comm.backend=nccl needs CUDA GPUs and this machine has none; "
                    "use comm.backend=gloo (or auto)"
                )
            raise ValueError(
                "comm.backend=nccl is not offered yet: it has not run on a multi-GPU machine. "
                "Use comm.backend=gloo (or auto): CUDA workers stage through pinned CPU buffers"
            )

    @property
    def world_size(self) -> int:
        """Processes this run needs: workers + server shards (1 by default), workers alone for
        topology=allreduce, or 1 for a sequential baseline."""
        if not self.algorithm.uses_server:
            return 1
        if self.topology == "allreduce":
            return self.workers
        return self.workers + self.server.shards


def _check_topology(cfg: TrainConfig) -> None:
    """The keys that topology=allreduce and server.shards > 1 cannot honour, with the fix."""
    if cfg.topology not in TOPOLOGIES:
        raise ValueError(f"topology={cfg.topology!r}; allowed: {', '.join(TOPOLOGIES)}")
    if cfg.topology == "server":
        cfg.algorithm.spec.check_parameter_server()
    if cfg.topology == "allreduce":
        cfg.algorithm.spec.check_allreduce()
        if cfg.server.shards != 1:
            raise ValueError("server.shards applies to topology=server; remove it or set it to 1")
        for key, value, default in (
            ("comm.overlap", cfg.comm.overlap, False),
            ("worker_failure", cfg.worker_failure, "fail_fast"),
            ("max_update_norm", cfg.max_update_norm, None),
        ):
            if value != default:
                raise ValueError(
                    f"{key}={value!r} is not supported with topology=allreduce (every rank waits "
                    f"for every other at each exchange); use {key}={default!r} or topology=server"
                )
    if cfg.mode == "simulate" and cfg.server.shards != 1:
        raise ValueError(
            "mode=simulate simulates one parameter server (topology=server) or the all-reduce "
            "rounds (topology=allreduce); use server.shards=1"
        )
    if cfg.server.shards > 1 and cfg.max_update_norm is not None:
        raise ValueError(
            "max_update_norm bounds the norm of a whole update, which no single shard sees; "
            "use max_update_norm=null with server.shards > 1 (non-finite updates are still refused)"
        )


def _rank_layout(cfg: TrainConfig) -> tuple[int, str]:
    """(server ranks, the run's ranks in words): the ranks a ``fault.*_rank`` may name."""
    p, k = cfg.workers, cfg.server.shards
    if not cfg.algorithm.uses_server:
        return 0, "a sequential baseline is one process, rank 0"
    if cfg.topology == "allreduce":
        return 0, f"topology=allreduce has ranks 0..{p - 1}, every one a worker"
    if k == 1:
        return 1, f"rank 0 is the server, ranks 1..{p} the workers"
    return k, f"ranks 0..{k - 1} are the shards, ranks {k}..{k + p - 1} the workers"


def _check_compression(cfg: TrainConfig) -> None:
    """comm.compression runs on the server topology (sharded too) and in mode=simulate."""
    name = cfg.comm.compression
    if name != "none" and cfg.mode != "simulate" and cfg.topology != "server":
        raise ValueError(
            f"comm.compression={name} runs with topology=server (sharded too) and mode=simulate; "
            "set comm.compression=none"
        )
    if name != "none" and cfg.checkpoint.ledger and cfg.algorithm.spec.ledger == "payload":
        raise ValueError(
            f"checkpoint.ledger sums the pushes sent, not the compressed ones the center applies "
            f"(comm.compression={name}); set checkpoint.ledger=false"
        )


def elastic_unserved(cfg: TrainConfig) -> str | None:
    """Why ``cfg`` cannot run with elastic membership (None: it can)."""
    if cfg.topology == "allreduce":
        return "topology=allreduce"
    if not cfg.algorithm.uses_server:
        return "a sequential baseline"
    if cfg.server.shards > 1:
        return f"server.shards={cfg.server.shards}"
    if cfg.mode == "simulate":
        return "mode=simulate"
    if cfg.checkpoint.ledger:
        return "checkpoint.ledger=true"
    return None


def membership_mode(cfg: TrainConfig, environ: Mapping[str, str] | None = None) -> str:
    """The membership this process runs: ``fixed`` or ``elastic``.

    ``auto`` resolves to elastic where it is served (:func:`elastic_unserved`), the launcher's
    rendezvous store is shared with its processes (torchrun's default; the store outlives the
    processes that come and go) and no ``fault.*`` is armed (a failure drill's documented outcome,
    the fault matrix, is the fixed roster's; ask for elastic to drill it), else to fixed.
    ``environ`` defaults to this process's.
    """
    if cfg.membership.mode != "auto":
        return cfg.membership.mode
    if cfg.membership.join is not None or cfg.membership.open_slots:
        return "elastic"  # asked for by name: nodes that come and go
    env = os.environ if environ is None else environ
    shared = env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    drill = bool(cfg.fault.armed())  # the fault matrix's outcomes are the fixed roster's
    return "elastic" if shared and not drill and elastic_unserved(cfg) is None else "fixed"


def _check_membership(cfg: TrainConfig) -> None:
    """membership.mode=elastic where it is served: one parameter server, real processes."""
    members = cfg.membership
    if members.open_slots > cfg.workers:
        raise ValueError(
            f"membership.open_slots={members.open_slots} is more than workers={cfg.workers} "
            "(the slots other nodes may fill are some of the p)"
        )
    if members.mode != "elastic" and members.join is None and not members.open_slots:
        return
    where = elastic_unserved(cfg)
    if where == "checkpoint.ledger=true":
        raise ValueError(
            "checkpoint.ledger audits consistent snapshots of a fixed roster; with "
            "membership.mode=elastic the server keeps every member's ledger itself "
            "(checkpoints/ledger-slot*.pt): set checkpoint.ledger=false"
        )
    if where is not None:
        raise ValueError(
            f"membership.mode=elastic serves workers that come and go on one parameter server "
            f"(topology=server, server.shards=1, mode=distributed), not {where}; "
            "use membership.mode=fixed"
        )


def _check_faults(cfg: TrainConfig) -> None:
    """Refuse a ``fault.*`` that this run could not fire, naming the key and the fix."""
    for kind, rank in cfg.fault.armed().items():
        key = f"fault.{kind}_rank={rank}"
        if cfg.mode == "simulate":
            raise ValueError(f"{key}: fault injection needs real processes; use mode=distributed")
        servers, layout = _rank_layout(cfg)
        if not 0 <= rank < cfg.world_size:
            raise ValueError(f"{key} is not a rank of this run ({layout}); name one of those")
        if rank < servers:  # a server rank fires kill (updates) and the single server's raise
            if kind in ("hang", "nan") or (kind == "raise" and servers > 1):
                raise ValueError(
                    f"{key} is a server rank ({layout}); a server fires only fault.kill_rank (and "
                    "a single server fault.raise_rank): name a worker rank"
                )
            continue
        if kind in ("hang", "nan") and not cfg.algorithm.uses_server:
            raise ValueError(
                f"{key}: a sequential baseline has no server or peer to notice a {kind}; "
                "use it with a distributed algorithm (e.g. algorithm=easgd)"
            )
        at_step = getattr(cfg.fault, f"{kind}_at_step")
        if not 1 <= at_step <= cfg.steps_per_worker:
            raise ValueError(
                f"fault.{kind}_at_step={at_step} is not a local step of worker rank {rank}, so "
                f"the fault would never fire; use 1..steps_per_worker={cfg.steps_per_worker}"
            )


def validate(cfg: DictConfig | TrainConfig) -> TrainConfig:
    """Turn a composed config into a checked :class:`TrainConfig` (raises ValueError if invalid)."""
    if isinstance(cfg, TrainConfig):
        return cfg
    schema = OmegaConf.structured(TrainConfig)
    merged = OmegaConf.merge(schema, cfg)
    obj = OmegaConf.to_object(merged)
    assert isinstance(obj, TrainConfig)
    return obj


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """A plain, picklable dict of the config (for child processes and summaries)."""
    container = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    assert isinstance(container, dict)
    return container  # type: ignore[return-value]
