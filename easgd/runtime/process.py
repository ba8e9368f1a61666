"""One process of a run: check the launch, build the components, then serve, work, or run alone.

Rank 0 is the parameter server; ranks 1..p are workers. The sequential baselines (sgd, msgd, asgd,
mvasgd) run in a single process through the same worker role and run log, so that comparisons
are like with like.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch

from easgd.comm.groups import (
    SERVER_RANK,
    DistEnv,
    PairGroups,
    check_world,
    choose_backend,
    init_pair_groups,
    shutdown,
)
from easgd.comm.heartbeat import HeartbeatMonitor, HeartbeatSender
from easgd.comm.message import Header, Op
from easgd.comm.transport import Delay, PairTransport
from easgd.config.schema import TrainConfig, to_dict
from easgd.data.sampling import MinibatchSampler
from easgd.data.split import Split
from easgd.flat import FlatModel
from easgd.roles import WorkerRole, make_server_role, make_worker_role
from easgd.runtime.checkpoint import Checkpointer, check_compatible
from easgd.runtime.components import build_model, build_split, device_for
from easgd.runtime.progress import Progress
from easgd.runtime.runlog import RunLog
from easgd.runtime.server import ParameterServer, StopRule
from easgd.runtime.worker import WorkerLoop, handshake

log = logging.getLogger("easgd")


def setup_logging(rank: int) -> None:
    """Log lines prefixed by the process's role."""
    name = "server" if rank == SERVER_RANK else f"worker{rank}"
    logging.basicConfig(
        level=os.environ.get("EASGD_LOG_LEVEL", "INFO"),
        format=f"[{name}] %(levelname)s %(message)s",
        force=True,
    )


def run_process(cfg: TrainConfig) -> dict[str, Any] | None:
    """Run this process's part; the server (or sequential process) returns the run summary."""
    env = DistEnv.from_environ()
    check_world(env, expected_world_size=cfg.world_size, workers=cfg.workers)
    torch.set_num_threads(cfg.threads)
    setup_logging(env.rank)
    split = build_split(cfg.data)
    if not cfg.algorithm.uses_server:
        return run_sequential(cfg, split)
    backend = choose_backend(cfg.comm.backend)
    pairs = init_pair_groups(env, backend=backend, timeout_s=cfg.comm.timeout_s)
    try:
        if env.rank == SERVER_RANK:
            return run_server(cfg, env, split, pairs)
        run_worker(cfg, env, split, pairs)
        return None
    finally:
        shutdown()


def _transport(cfg: TrainConfig, peer: int, group: Any, numel: int, own_rank: int) -> PairTransport:
    return PairTransport(
        peer=peer,
        group=group,
        numel=numel,
        delay=Delay(cfg.comm.latency_ms, cfg.comm.jitter_ms),
        seed=cfg.seed * 7919 + own_rank * 31 + peer,
    )


def _evaluator(cfg: TrainConfig, split: Split) -> FlatModel:
    """A CPU copy of the model for test-set evaluation."""
    return FlatModel(
        build_model(cfg.model, split, seed=cfg.seed), weight_decay=cfg.algorithm.weight_decay
    )


def _signature(cfg: TrainConfig, num_params: int) -> dict[str, Any]:
    """What a checkpoint must match to be resumed by this run."""
    return {
        "algorithm": cfg.algorithm.name,
        "model": cfg.model.name,
        "num_params": num_params,
        "workers": cfg.workers,
    }


def _resume(
    checkpointer: Checkpointer, cfg: TrainConfig, signature: dict[str, Any]
) -> dict[str, Any] | None:
    """The newest intact, compatible checkpoint's state (None: start fresh)."""
    if not cfg.checkpoint.resume:
        return None
    found = checkpointer.latest()
    if found is None:
        return None
    path, state = found
    check_compatible(state, path=path, signature=signature)
    log.info("resuming from %s", path)
    return state


def run_server(cfg: TrainConfig, env: DistEnv, split: Split, pairs: PairGroups) -> dict[str, Any]:
    """Rank 0: hold the center, serve the workers, evaluate, checkpoint, write the run directory."""
    flat = _evaluator(cfg, split)
    role = make_server_role(cfg.algorithm, flat.initial_point(), num_workers=cfg.workers)
    signature = _signature(cfg, flat.num_params)
    checkpointer = Checkpointer(
        Path(cfg.run_dir) / "checkpoints", "server", keep=cfg.checkpoint.keep
    )
    state = _resume(checkpointer, cfg, signature)
    restarts, exchanges_before, steps_before_crash = 0, 0, {}
    if state is not None:
        role.load_state_dict(state["role"])
        restarts, exchanges_before = int(state["restarts"]) + 1, int(state["exchanges"])
        steps_before_crash = _read_progress(cfg)
    transports = {
        rank: _transport(cfg, rank, group, flat.num_params, SERVER_RANK)
        for rank, group in pairs.groups.items()
    }
    runlog = RunLog(cfg.run_dir, tensorboard=cfg.tensorboard)
    log.info(
        "%s with %d workers, tau=%d, %d parameters; run directory %s",
        cfg.algorithm.name,
        cfg.workers,
        cfg.comm.period,
        flat.num_params,
        os.path.abspath(cfg.run_dir),
    )
    server = ParameterServer(
        role,
        transports,
        evaluate=lambda point: flat.evaluate(point, split.test_x, split.test_y),
        runlog=runlog,
        stop_rule=StopRule(max_wall_s=cfg.max_wall_s, target_test_error=cfg.target_test_error),
        eval_interval_s=cfg.eval_interval_s,
        total_steps=cfg.workers * cfg.steps_per_worker,
        continue_on_failure=cfg.worker_failure == "continue",
        progress=cfg.progress,
        exchanges_before=exchanges_before,
        heartbeat=HeartbeatMonitor(
            pairs.store, list(pairs.groups), timeout_s=cfg.comm.heartbeat_timeout_s
        ),
        max_update_norm=cfg.max_update_norm,
    )

    def save() -> None:
        with server.lock:
            snapshot = {
                "role": role.state_dict(),
                "exchanges": server.exchanges,
                "restarts": restarts,
                "signature": signature,
            }
        checkpointer.save(snapshot)

    last_save = time.perf_counter()

    def on_tick() -> None:
        nonlocal last_save
        _write_progress(cfg, {r: s.steps for r, s in server.stats.items()})
        if (
            cfg.fault.kill_rank == SERVER_RANK
            and env.restart_count == 0
            and role.updates >= cfg.fault.kill_at_step
        ):
            _kill_self("server", role.updates)
        if cfg.checkpoint.every_s and time.perf_counter() - last_save >= cfg.checkpoint.every_s:
            save()
            last_save = time.perf_counter()

    server.on_tick = on_tick
    try:
        try:
            outcome = server.run()
        finally:
            # also when a worker failed: the center is intact, and a restart resumes from here
            _write_progress(cfg, {r: s.steps for r, s in server.stats.items()})
            save()
        redone = sum(
            max(0, steps_before_crash.get(r, 0) - s) for r, s in server.resumed_steps.items()
        )
        summary = _summary(
            cfg,
            num_params=flat.num_params,
            wall_time_s=outcome.wall_time_s,
            exchanges=outcome.exchanges,
            server_updates=outcome.server_updates,
            worker_steps=outcome.worker_steps,
            test_loss=outcome.test_loss,
            test_error=outcome.test_error,
            stop_reason=outcome.stop_reason,
            extra={
                "rejected_messages": outcome.rejected,
                "failed_workers": {str(r): why for r, why in outcome.failed_workers.items()},
                "restarts": restarts,
                "resumed_worker_steps": {str(r): s for r, s in server.resumed_steps.items()},
                "redone_worker_steps": redone,
                "worker_steps_per_s": {str(r): s.steps_per_s for r, s in server.stats.items()},
            },
        )
        runlog.hparams(
            _hparams(cfg), {"test_error": outcome.test_error, "test_loss": outcome.test_loss}
        )
        path = runlog.summary(summary)
    finally:
        runlog.close()
    log.info(
        "done in %.1f s: center test error %.2f%%, %d exchanges (%.0f/s); summary in %s",
        summary["wall_time_s"],
        100 * summary["test_error"],
        summary["exchanges"],
        summary["exchanges_per_s"],
        path,
    )
    return summary


def _progress_path(cfg: TrainConfig) -> Path:
    return Path(cfg.run_dir) / "checkpoints" / "progress.json"


def _write_progress(cfg: TrainConfig, steps: dict[int, int]) -> None:
    """The server's latest view of each worker's steps, to measure progress redone after a crash."""
    path = _progress_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({str(r): s for r, s in steps.items()}))
    os.replace(tmp, path)


def _read_progress(cfg: TrainConfig) -> dict[int, int]:
    path = _progress_path(cfg)
    if not path.is_file():
        return {}
    return {int(r): int(s) for r, s in json.loads(path.read_text()).items()}


def _kill_self(who: str, step: int) -> None:
    """Failure injection: die as abruptly as a machine fault would."""
    log.warning("fault injection: %s sends itself SIGKILL at step %d", who, step)
    logging.shutdown()
    os.kill(os.getpid(), signal.SIGKILL)


def run_worker(cfg: TrainConfig, env: DistEnv, split: Split, pairs: PairGroups) -> None:
    """Ranks 1..p: local steps on this worker's data stream, exchanges with the server."""
    device = device_for(cfg, env.local_rank)
    model = build_model(cfg.model, split, seed=cfg.seed).to(device)
    flat = FlatModel(model, weight_decay=cfg.algorithm.weight_decay)
    transport = _transport(cfg, SERVER_RANK, pairs.groups[env.rank], flat.num_params, env.rank)
    index = env.rank - 1
    heartbeat = HeartbeatSender(pairs.store, env.rank).start()
    checkpointer = Checkpointer(
        Path(cfg.run_dir) / "checkpoints", f"worker{env.rank}", keep=cfg.checkpoint.keep
    )
    signature = _signature(cfg, flat.num_params)
    try:
        sampler = MinibatchSampler(
            split,
            batch_size=cfg.data.batch_size,
            worker_index=index,
            num_workers=cfg.workers,
            mode=cfg.data.sampling,
            seed=cfg.seed,
            device=device,
        )
        state = _resume(checkpointer, cfg, signature)
        resumed_step = int(state["role"]["step"]) if state is not None else 0
        center = handshake(transport, step=resumed_step).to(device)
        role = make_worker_role(cfg.algorithm, center, comm_period=cfg.comm.period)
        if state is not None:
            role.load_state_dict(
                {
                    k: v.to(device) if isinstance(v, torch.Tensor) else v
                    for k, v in state["role"].items()
                }
            )
            sampler.generator.set_state(state["rng"])
        last_save = time.perf_counter()
        fault = cfg.fault
        first_attempt = env.restart_count == 0

        def after_step(role: WorkerRole) -> None:
            nonlocal last_save
            step = role.step
            if first_attempt and fault.kill_rank == env.rank and step == fault.kill_at_step:
                _kill_self(f"worker {env.rank}", step)
            if first_attempt and fault.raise_rank == env.rank and step == fault.raise_at_step:
                raise RuntimeError(f"fault injection: worker {env.rank} raises at step {step}")
            if first_attempt and fault.hang_rank == env.rank and step == fault.hang_at_step:
                log.warning(
                    "fault injection: worker %d stops itself (SIGSTOP) at step %d", env.rank, step
                )
                os.kill(os.getpid(), signal.SIGSTOP)
            if fault.nan_rank == env.rank and step == fault.nan_at_step:
                log.warning(
                    "fault injection: worker %d parameters set to NaN at step %d", env.rank, step
                )
                role.params = torch.full_like(role.params, float("nan"))
            if cfg.checkpoint.every_s and time.perf_counter() - last_save >= cfg.checkpoint.every_s:
                checkpointer.save(
                    {
                        "role": role.state_dict(),
                        "rng": sampler.generator.get_state(),
                        "signature": signature,
                    }
                )
                last_save = time.perf_counter()

        loop = WorkerLoop(
            role,
            transport,
            lambda point: flat.loss_and_grad(point, *sampler.sample()),
            steps=cfg.steps_per_worker,
            slowdown=cfg.comm.slowdown[index] if cfg.comm.slowdown else 1.0,
            overlap=cfg.comm.overlap,
            to_device=lambda t: t.to(device, non_blocking=True),
            after_step=after_step,
        )
        outcome = loop.run()
        checkpointer.save(
            {
                "role": role.state_dict(),
                "rng": sampler.generator.get_state(),
                "signature": signature,
            }
        )
    except Exception:
        if cfg.worker_failure != "continue":
            raise
        log.exception("worker %d failed; leaving the run (worker_failure=continue)", env.rank)
        with contextlib.suppress(Exception):  # the server may be gone too
            transport.send(Header(Op.FAILED, step=0))
        return
    finally:
        heartbeat.stop()
    log.debug(
        "finished %d steps, %d exchanges (%.2f ms each), %d resets",
        outcome.steps,
        outcome.exchanges,
        outcome.mean_exchange_ms,
        outcome.resets,
    )


def run_sequential(cfg: TrainConfig, split: Split) -> dict[str, Any]:
    """A sequential baseline (p = 1, no server) through the same role, log and summary."""
    flat = _evaluator(cfg, split)
    role = make_worker_role(cfg.algorithm, flat.initial_point(), comm_period=1)
    sampler = MinibatchSampler(
        split, batch_size=cfg.data.batch_size, worker_index=0, num_workers=1, seed=cfg.seed
    )
    runlog = RunLog(cfg.run_dir, tensorboard=cfg.tensorboard)
    progress = Progress(cfg.steps_per_worker, enabled=cfg.progress)
    started = time.perf_counter()
    next_eval = 0.0
    stop_reason = "steps"

    def evaluate() -> dict[str, float]:
        metrics = flat.evaluate(role.evaluated(), split.test_x, split.test_y)
        runlog.evaluation(
            wall_s=time.perf_counter() - started,
            exchanges=0,
            server_updates=0,
            worker_steps=role.step,
            **metrics,
        )
        progress.note(test_error=metrics["test_error"])
        return metrics

    try:
        while role.step < cfg.steps_per_worker:
            now = time.perf_counter() - started
            if now >= next_eval:
                metrics = evaluate()
                next_eval = now + cfg.eval_interval_s
                if (
                    cfg.target_test_error is not None
                    and metrics["test_error"] <= cfg.target_test_error
                ):
                    stop_reason = "target_test_error"
                    break
            if cfg.max_wall_s is not None and now >= cfg.max_wall_s:
                stop_reason = "max_wall_s"
                break
            loss, grad = flat.loss_and_grad(role.gradient_point(), *sampler.sample())
            role.local_step(grad)
            runlog.scalar("worker1/train_loss", loss, role.step)
            progress.advance(1, exchanges=0)
        metrics = evaluate()
        progress.close()
        summary = _summary(
            cfg,
            num_params=flat.num_params,
            wall_time_s=time.perf_counter() - started,
            exchanges=0,
            server_updates=0,
            worker_steps=role.step,
            test_loss=metrics["test_loss"],
            test_error=metrics["test_error"],
            stop_reason=stop_reason,
        )
        runlog.hparams(
            _hparams(cfg), {"test_error": metrics["test_error"], "test_loss": metrics["test_loss"]}
        )
        runlog.summary(summary)
    finally:
        runlog.close()
    log.info(
        "done in %.1f s: test error %.2f%%", summary["wall_time_s"], 100 * summary["test_error"]
    )
    return summary


def _summary(
    cfg: TrainConfig,
    *,
    num_params: int,
    wall_time_s: float,
    exchanges: int,
    server_updates: int,
    worker_steps: int,
    test_loss: float,
    test_error: float,
    stop_reason: str,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    workers = cfg.workers if cfg.algorithm.uses_server else 1
    return {
        "algorithm": cfg.algorithm.name,
        "workers": workers,
        "comm_period": cfg.comm.period if cfg.algorithm.uses_server else None,
        "steps_per_worker": cfg.steps_per_worker,
        "worker_steps": worker_steps,
        "exchanges": exchanges,
        "server_updates": server_updates,
        "exchanges_per_s": exchanges / max(wall_time_s, 1e-9),
        "wall_time_s": wall_time_s,
        "test_error": test_error,
        "test_loss": test_loss,
        "stop_reason": stop_reason,
        "learning_rate": cfg.algorithm.learning_rate,
        "momentum": cfg.algorithm.momentum,
        "moving_rate": cfg.algorithm.resolved_moving_rate(workers)
        if cfg.algorithm.name in ("easgd", "eamsgd")
        else None,
        "dataset": cfg.data.name,
        "model": cfg.model.name,
        "num_params": num_params,
        "latency_ms": cfg.comm.latency_ms,
        "jitter_ms": cfg.comm.jitter_ms,
        "seed": cfg.seed,
        "config": to_dict(cfg),
        **(extra or {}),
    }


def _hparams(cfg: TrainConfig) -> dict[str, Any]:
    return {
        "algorithm": cfg.algorithm.name,
        "workers": cfg.workers,
        "comm_period": cfg.comm.period,
        "learning_rate": cfg.algorithm.learning_rate,
        "momentum": cfg.algorithm.momentum,
        "beta": cfg.algorithm.beta,
        "latency_ms": cfg.comm.latency_ms,
        "dataset": cfg.data.name,
        "model": cfg.model.name,
    }
