"""A worker rank's part of a run: build the model and data stream, resume, step, checkpoint."""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import torch

from easgd.comm.groups import DistEnv, PairGroups
from easgd.comm.heartbeat import HeartbeatSender
from easgd.comm.message import Header, Op
from easgd.config.schema import TrainConfig
from easgd.data.sampling import MinibatchSampler
from easgd.data.split import Split
from easgd.flat import FlatModel
from easgd.roles import WorkerRole, make_worker_role
from easgd.runtime.checkpoint import Checkpointer
from easgd.runtime.components import build_model, device_for, worker_transport
from easgd.runtime.faults import hang_self, kill_self
from easgd.runtime.resume import checkpoint_signature, resume_state
from easgd.runtime.worker import WorkerLoop, handshake

log = logging.getLogger("easgd")


def run_worker(cfg: TrainConfig, env: DistEnv, split: Split, pairs: PairGroups) -> None:
    """Ranks 1..p: local steps on this worker's data stream, exchanges with the server."""
    device = device_for(cfg, env.local_rank)
    model = build_model(cfg.model, split, seed=cfg.seed).to(device)
    flat = FlatModel(model, weight_decay=cfg.algorithm.weight_decay)
    # -- scale: with server.shards = k, ranks 0..k-1 hold the center and the transport talks to all
    transport = worker_transport(cfg, pairs.groups, flat.num_params, env.rank)
    index = env.rank - cfg.server.shards
    # -- end scale --
    heartbeat = HeartbeatSender(pairs.store, env.rank).start()
    checkpointer = Checkpointer(
        Path(cfg.run_dir) / "checkpoints", f"worker{env.rank}", keep=cfg.checkpoint.keep
    )
    signature = checkpoint_signature(cfg, flat.num_params)
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
        state = resume_state(checkpointer, cfg, signature)
        resumed_step = int(state["role"]["step"]) if state is not None else 0
        center = handshake(transport, step=resumed_step).to(device)
        role = make_worker_role(
            cfg.algorithm, center, comm_period=cfg.comm.period, scratch=flat.flat_params
        )
        if state is not None:
            role.load_state_dict(
                {
                    k: v.to(device) if isinstance(v, torch.Tensor) else v
                    for k, v in state["role"].items()
                }
            )
            sampler.generator.set_state(state["rng"])

        def save() -> None:
            state = {
                "role": role.state_dict(),
                "rng": sampler.generator.get_state(),
                "signature": signature,
            }
            checkpointer.save(state)

        last_save = time.perf_counter()
        fault = cfg.fault
        first_attempt = env.restart_count == 0

        def after_step(role: WorkerRole) -> None:
            nonlocal last_save
            step = role.step
            if first_attempt and fault.kill_rank == env.rank and step == fault.kill_at_step:
                kill_self(f"worker {env.rank}", step)
            if first_attempt and fault.raise_rank == env.rank and step == fault.raise_at_step:
                raise RuntimeError(f"fault injection: worker {env.rank} raises at step {step}")
            if first_attempt and fault.hang_rank == env.rank and step == fault.hang_at_step:
                hang_self(f"worker {env.rank}", step)
            if fault.nan_rank == env.rank and step == fault.nan_at_step:
                log.warning(
                    "fault injection: worker %d parameters set to NaN at step %d", env.rank, step
                )
                role.params = torch.full_like(role.params, float("nan"))
            if cfg.checkpoint.every_s and time.perf_counter() - last_save >= cfg.checkpoint.every_s:
                save()
                last_save = time.perf_counter()

        loop = WorkerLoop(
            role,
            transport,
            lambda point: flat.gradient(point, *sampler.sample()),
            steps=cfg.steps_per_worker,
            slowdown=cfg.comm.slowdown[index] if cfg.comm.slowdown else 1.0,
            overlap=cfg.comm.overlap,
            to_device=lambda t: t.to(device, non_blocking=True),
            after_step=after_step,
        )
        outcome = loop.run()
        save()
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
