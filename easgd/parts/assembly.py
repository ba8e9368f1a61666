"""The shared parts of a run: built once here, the same way for every topology and mode.

A topology (the parameter server, a sharded center, all-reduce, a sequential baseline,
``mode=simulate``) declares only which ranks play which role and how they exchange; everything
else comes from here:

- :class:`RunParts`: the data split (loaded once per process), the device, the model and its flat
  view, the evaluator, each worker's minibatch sampler and slowdown, the checkpoint signature and
  the fault injector of a rank;
- :class:`RunRecord`: what the process that owns the run's record keeps: the run log
  (metrics.csv, TensorBoard, summary.json), the stop rule, the evaluation cadence and the
  progress bar; every other process holds one that records nothing.

Example::

    parts = RunParts.load(cfg)                      # threads set, data loaded
    flat = parts.flat_model(parts.device(local_rank))
    sampler = parts.sampler(worker_index, device=flat_device)
    record = parts.record(lead=rank == 0)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from easgd.config.schema import TrainConfig
from easgd.data.sampling import MinibatchSampler
from easgd.data.split import Split
from easgd.flat import FlatModel
from easgd.models.step import for_local_steps
from easgd.parts.build import build_model, build_split, device_for
from easgd.parts.faults import FaultInjector
from easgd.parts.progress import Progress
from easgd.parts.runlog import RunLog
from easgd.parts.summary import Summary, hparams_of, write_summary
from easgd.recovery.resume import checkpoint_signature, committed_snapshot


@dataclass
class StopRule:
    """When the server tells the workers to stop (besides their own step budget)."""

    max_wall_s: float | None = None
    target_test_error: float | None = None

    def reason(self, *, elapsed_s: float, test_error: float | None = None) -> str | None:
        """Why to stop now: the target on a fresh ``test_error``, or the wall-clock budget; else None."""
        target = self.target_test_error
        if test_error is not None and target is not None and test_error <= target:
            return "target_test_error"
        if self.max_wall_s is not None and elapsed_s >= self.max_wall_s:
            return "max_wall_s"
        return None


@dataclass
class EvalCadence:
    """When the evaluated variable is evaluated next: at the start, then every ``interval_s``."""

    interval_s: float
    next_at: float = 0.0
    """Elapsed seconds (of the run's clock) at which the next evaluation is due."""

    def due(self, elapsed_s: float) -> bool:
        """Whether an evaluation is due at ``elapsed_s``."""
        return elapsed_s >= self.next_at

    def done(self, elapsed_s: float) -> None:
        """An evaluation was made at ``elapsed_s``; the next is one interval later."""
        self.next_at = elapsed_s + self.interval_s


@dataclass
class RunRecord:
    """The run's record, owned by one process: run log, stop rule, evaluation cadence, progress.

    ``stop_reason`` starts as "steps" (the step budget ends the run) and is set once, by the
    first rule that fires.
    """

    cfg: TrainConfig
    runlog: RunLog
    stop_rule: StopRule
    cadence: EvalCadence
    progress: Progress
    started: float = field(default_factory=time.perf_counter)
    stop_reason: str = "steps"

    @property
    def lead(self) -> bool:
        """Whether this process writes the run's record."""
        return self.runlog.run_dir is not None

    def elapsed(self) -> float:
        """Seconds since :meth:`start` (wall clock)."""
        return time.perf_counter() - self.started

    def start(self) -> None:
        """Training starts now (the clock of wall_s, max_wall_s and the cadence)."""
        self.started = time.perf_counter()
        self.cadence.next_at = 0.0

    def evaluated(
        self, metrics: dict[str, float], *, exchanges: int, server_updates: int, worker_steps: int
    ) -> None:
        """Record one evaluation (made now) and apply the stop rules to its test error."""
        elapsed = self.elapsed()
        self.runlog.evaluation(
            wall_s=elapsed,
            exchanges=exchanges,
            server_updates=server_updates,
            worker_steps=worker_steps,
            test_loss=metrics["test_loss"],
            test_error=metrics["test_error"],
        )
        self.progress.note(test_error=metrics["test_error"])
        self.cadence.done(elapsed)
        self.check_stop(test_error=metrics["test_error"])

    def check_stop(self, *, test_error: float | None = None) -> bool:
        """Apply the stop rules (the target on a fresh ``test_error``, the wall-clock budget);
        True once any rule has fired."""
        if self.stop_reason == "steps":
            reason = self.stop_rule.reason(elapsed_s=self.elapsed(), test_error=test_error)
            self.stop_reason = reason or "steps"
        return self.stop_reason != "steps"

    def finish(self, summary: Summary) -> dict[str, Any]:
        """Close the progress bar, write summary.json and the HParams entry, close the log."""
        self.progress.close()
        try:
            return write_summary(self.runlog, summary, hparams_of(self.cfg))
        finally:
            self.runlog.close()

    def close(self) -> None:
        """Close the log and the bar without a summary (a failed run)."""
        self.progress.close()
        self.runlog.close()


@dataclass
class RunParts:
    """What every process of a run of ``cfg`` builds from the config, the same way everywhere."""

    cfg: TrainConfig
    split: Split

    @classmethod
    def load(cls, cfg: TrainConfig) -> RunParts:
        """Set this process's intra-op threads and load the data split (once per process)."""
        torch.set_num_threads(cfg.threads)
        return cls(cfg, build_split(cfg.data))

    def device(self, local_rank: int) -> torch.device:
        """A worker's device: CUDA (one GPU per local worker, round robin) or CPU."""
        return device_for(self.cfg, local_rank)

    def model(self, device: torch.device | str = "cpu") -> nn.Module:
        """The configured network, initialised from ``seed`` (identical on every rank), its
        training forward set up for ``optim.precision`` and ``optim.compile``."""
        module = build_model(self.cfg.model, self.split, seed=self.cfg.seed).to(device)
        optim = self.cfg.optim
        return for_local_steps(module, precision=optim.precision, compile=optim.compile)

    def flat_model(self, device: torch.device | str = "cpu") -> FlatModel:
        """The model and its flat view (weight decay in the gradient, as the spec's g)."""
        return FlatModel(self.model(device), weight_decay=self.cfg.algorithm.weight_decay)

    def sampler(
        self, worker_index: int, *, num_workers: int | None = None, device: torch.device | str
    ) -> MinibatchSampler:
        """Worker ``worker_index`` (0-based) of ``num_workers`` (default: ``workers``): its own
        minibatch stream (``data.sampling``), seeded from ``seed`` and its index."""
        return MinibatchSampler(
            self.split,
            batch_size=self.cfg.data.batch_size,
            worker_index=worker_index,
            num_workers=self.cfg.workers if num_workers is None else num_workers,
            mode=self.cfg.data.sampling,
            seed=self.cfg.seed,
            device=device,
        )

    def slowdown(self, worker_index: int) -> float:
        """The straggler factor of worker ``worker_index`` (``comm.slowdown``; 1: none)."""
        return self.cfg.comm.slowdown[worker_index] if self.cfg.comm.slowdown else 1.0

    def signature(self, num_params: int, **extra: Any) -> dict[str, Any]:
        """What a checkpoint must match to be resumed by this run (``extra``: the topology's)."""
        return {**checkpoint_signature(self.cfg, num_params), **extra}

    def faults(self, rank: int, *, generation: int, who: str | None = None) -> FaultInjector:
        """The ``fault.*`` injector of ``rank`` (fires only in the job's first start)."""
        cfg = self.cfg
        return FaultInjector(
            cfg.fault,
            rank,
            generation=generation,
            who=who,
            committed=lambda: committed_snapshot(cfg) is not None,
        )

    def record(
        self, *, lead: bool, total_steps: int | None = None, progress: bool = True
    ) -> RunRecord:
        """The run's record: writing into ``run_dir`` on the ``lead`` process, nothing elsewhere.

        ``total_steps``: the progress bar's length (default: every worker's step budget);
        ``progress=False``: no bar whatever ``cfg.progress`` says (a run that records afterwards).
        """
        cfg = self.cfg
        total = cfg.workers * cfg.steps_per_worker if total_steps is None else total_steps
        return RunRecord(
            cfg,
            RunLog(cfg.run_dir if lead else None, tensorboard=cfg.tensorboard),
            StopRule(max_wall_s=cfg.max_wall_s, target_test_error=cfg.target_test_error),
            EvalCadence(cfg.eval_interval_s),
            Progress(total, enabled=cfg.progress and lead and progress),
        )
