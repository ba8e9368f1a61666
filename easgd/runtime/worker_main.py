"""A worker rank's part of a run: build the model and data stream, resume, step, snapshot."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch

from easgd.comm.groups import DistEnv, PairGroups
from easgd.comm.heartbeat import LoopHeartbeat
from easgd.comm.message import ServerFailed
from easgd.config.schema import TrainConfig
from easgd.data.sampling import MinibatchSampler
from easgd.data.split import Split
from easgd.flat import FlatModel
from easgd.roles import WorkerRole, make_worker_role
from easgd.runtime.checkpoint import Checkpointer
from easgd.runtime.components import build_model, device_for, worker_transport
from easgd.runtime.faults import FaultInjector
from easgd.runtime.resume import checkpoint_dir, checkpoint_signature, resume_worker
from easgd.runtime.snapshot import Ledger, StepMarker, WorkerSnapshots
from easgd.runtime.worker import WorkerLoop, handshake

log = logging.getLogger("easgd")


def _copy(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def run_worker(cfg: TrainConfig, env: DistEnv, split: Split, pairs: PairGroups) -> None:
    """Ranks 1..p: local steps on this worker's data stream, exchanges with the server."""
    device = device_for(cfg, env.local_rank)
    model = build_model(cfg.model, split, seed=cfg.seed).to(device)
    flat = FlatModel(model, weight_decay=cfg.algorithm.weight_decay)
    # with server.shards = k, ranks 0..k-1 hold the center and the transport talks to all of them
    transport = worker_transport(
        cfg, pairs.groups, flat.num_params, env.rank, pin_memory=device.type == "cuda"
    )
    index = env.rank - cfg.server.shards
    heartbeat = LoopHeartbeat(pairs.store, env.rank, timeout_s=cfg.comm.heartbeat_timeout_s)
    heartbeat.start()
    name = f"worker{env.rank}"
    checkpointer = Checkpointer(checkpoint_dir(cfg), name, keep=cfg.checkpoint.keep)
    marker = StepMarker(checkpoint_dir(cfg) / f"{name}.step")
    faults = FaultInjector(cfg.fault, env.rank, generation=pairs.generation)
    signature = checkpoint_signature(cfg, flat.num_params)
    loop: WorkerLoop | None = None
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
        state = resume_worker(checkpointer, cfg, signature)
        resumed_step = int(state["role"]["step"]) if state is not None else 0
        redone = marker.start(resumed_step, resumed=state is not None)
        center = handshake(transport, step=resumed_step, redone_steps=redone).to(device)
        role = make_worker_role(
            cfg.algorithm, center, comm_period=cfg.comm.period, scratch=flat.flat_params
        )
        ledger = Ledger(role, cfg.algorithm.name) if cfg.checkpoint.ledger else None
        if state is not None:
            role.load_state_dict(
                {
                    k: v.to(device) if isinstance(v, torch.Tensor) else v
                    for k, v in state["role"].items()
                }
            )
            sampler.generator.set_state(state["rng"])
            if ledger is not None:
                ledger.total.copy_(state["ledger"])

        def capture() -> dict[str, Any]:
            return {
                "role": _copy(role.state_dict()),
                "rng": sampler.generator.get_state(),
                "signature": signature,
                **({"ledger": ledger.total.clone()} if ledger is not None else {}),
            }

        def after_step(role: WorkerRole) -> None:
            marker.mark(role.step)
            heartbeat.beat()
            heartbeat.check()
            faults.worker_step(role.step, role.params)

        loop = WorkerLoop(
            role,
            transport,
            lambda point: flat.gradient(point, *sampler.sample()),
            steps=cfg.steps_per_worker,
            slowdown=cfg.comm.slowdown[index] if cfg.comm.slowdown else 1.0,
            overlap=cfg.comm.overlap,
            to_device=lambda t: t.to(device, non_blocking=True),
            after_step=after_step,
            snapshots=WorkerSnapshots(checkpointer, capture, after_reply=cfg.server.shards > 1),
        )
        if ledger is not None:
            ledger.attach(loop)
        outcome = loop.run()
    except ServerFailed as err:  # the server's traceback ends the run, not this worker's
        log.error("%s; leaving", err)
        return
    except Exception:
        if cfg.worker_failure != "continue":
            raise
        log.exception("worker %d failed; leaving the run (worker_failure=continue)", env.rank)
        with contextlib.suppress(Exception):  # the server may be gone too
            if loop is not None and not loop.send_failed():
                log.warning("could not tell the server: the exchange thread is still running")
        return
    finally:
        heartbeat.stop()
        marker.close()
    log.debug(
        "finished %d steps, %d exchanges (%.2f ms each), %d resets",
        outcome.steps,
        outcome.exchanges,
        outcome.mean_exchange_ms,
        outcome.resets,
    )
