"""A worker rank's part of a parameter-server run (one server or a sharded center).

The shared parts (:mod:`easgd.parts.assembly`) give the model, the minibatch stream, the
signature and the fault injector; what is this module's own: the link to the center, the
heartbeat and the kill-proof step marker, resuming this worker's part of the committed snapshot,
and the :class:`~easgd.engine.worker.WorkerLoop` with its subscribers (marker, heartbeat,
faults, snapshots, ledger).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch

from easgd.comm.groups import DistEnv, PairGroups
from easgd.comm.heartbeat import LoopHeartbeat
from easgd.comm.message import ServerFailed
from easgd.engine.worker import WorkerLoop, handshake
from easgd.parts import interrupt
from easgd.parts.assembly import RunParts
from easgd.parts.build import worker_transport
from easgd.recovery.checkpoint import Checkpointer
from easgd.recovery.resume import checkpoint_dir, resume_worker
from easgd.recovery.snapshot import Ledger, StepMarker, WorkerSnapshots
from easgd.roles import WorkerRole, make_worker_role

log = logging.getLogger("easgd")


def _copy(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


class WorkerProcess:
    """Worker rank ``env.rank``: its model, data stream, link to the center and restart state."""

    keeps_snapshots = True
    """Whether this worker saves its parts of consistent snapshots (a fixed roster does)."""

    def __init__(self, parts: RunParts, env: DistEnv, pairs: PairGroups) -> None:
        cfg = self.cfg = parts.cfg
        self.rank = env.rank
        self.index = env.rank - cfg.server.shards  # ranks 0..k-1 hold the center
        self.device = parts.device(env.local_rank)
        self.flat = parts.flat_model(self.device)
        self.sampler = parts.sampler(self.index, device=self.device)
        self.slowdown = parts.slowdown(self.index)
        self.transport = worker_transport(
            cfg,
            pairs.groups,
            self.flat.num_params,
            env.rank,
            pin_memory=self.device.type == "cuda",
            direct=pairs.direct,
        )
        self.heartbeat = LoopHeartbeat(
            pairs.store, env.rank, timeout_s=cfg.comm.heartbeat_timeout_s
        )
        name = f"worker{env.rank}"
        self.checkpointer = Checkpointer(checkpoint_dir(cfg), name, keep=cfg.checkpoint.keep)
        self.marker = StepMarker(checkpoint_dir(cfg) / f"{name}.step")
        self.faults = parts.faults(env.rank, generation=pairs.generation)
        self.signature = parts.signature(self.flat.num_params)
        self.ledger: Ledger | None = None
        self.loop: WorkerLoop | None = None
        # on SIGINT/SIGTERM the server stops this worker; a worker stuck in its loop ends anyway
        interrupt.watch(self._progress, stuck_after_s=cfg.comm.heartbeat_timeout_s)

    def _progress(self) -> int:
        return self.loop.role.step if self.loop is not None else -1

    def _make_role(self, center: torch.Tensor) -> WorkerRole:
        """This worker's role, starting from ``center`` (the server's HELLO reply)."""
        cfg = self.cfg
        return make_worker_role(
            cfg.algorithm,
            center.to(self.device),
            comm_period=cfg.comm.period,
            scratch=self.flat.flat_params,
            schedule=cfg.optim.schedule(cfg.steps_per_worker),
            max_grad_norm=cfg.optim.clip_grad_norm,
        )

    def _join(self) -> WorkerRole:
        """Resume this worker's part of the committed snapshot (if any), say HELLO, build the role."""
        cfg = self.cfg
        state = resume_worker(self.checkpointer, cfg, self.signature)
        resumed_step = int(state["role"]["step"]) if state is not None else 0
        redone = self.marker.start(resumed_step, resumed=state is not None)
        center = handshake(self.transport, step=resumed_step, redone_steps=redone)
        role = self._make_role(center)
        self.ledger = Ledger(role, cfg.algorithm.name) if cfg.checkpoint.ledger else None
        if state is not None:
            role.load_state_dict({k: _to(v, self.device) for k, v in state["role"].items()})
            self.sampler.generator.set_state(state["rng"])
            if self.ledger is not None:
                self.ledger.total.copy_(state["ledger"])
        return role

    def _capture(self, role: WorkerRole) -> dict[str, Any]:
        """This worker's part of a snapshot: copies of its role, its sampler's RNG, its ledger."""
        ledger = {"ledger": self.ledger.total.clone()} if self.ledger is not None else {}
        return {
            "role": _copy(role.state_dict()),
            "rng": self.sampler.generator.get_state(),
            "signature": self.signature,
            **ledger,
        }

    def _after_step(self, role: WorkerRole) -> None:
        self.marker.mark(role.step)
        self.heartbeat.beat()
        self.heartbeat.check()
        self.faults.worker_step(role.step, role.params)

    def _loop(self, role: WorkerRole) -> WorkerLoop:
        cfg, flat, sampler = self.cfg, self.flat, self.sampler
        snapshots = (
            WorkerSnapshots(
                self.checkpointer, lambda: self._capture(role), after_reply=cfg.server.shards > 1
            )
            if self.keeps_snapshots
            else None
        )
        loop = WorkerLoop(
            role,
            self.transport,
            lambda point: flat.gradient(point, *sampler.sample()),
            steps=cfg.steps_per_worker,
            slowdown=self.slowdown,
            overlap=cfg.comm.overlap,
            to_device=lambda t: t.to(self.device, non_blocking=True),
            after_step=self._after_step,
            snapshots=snapshots,
        )
        if self.ledger is not None:
            self.ledger.attach(loop)
        return loop

    def run(self) -> None:
        """Train to the end; a failure ends the run unless ``worker_failure=continue``."""
        self.heartbeat.start()
        try:
            self.loop = self._loop(self._join())
            outcome = self.loop.run()
            log.debug(
                "finished %d steps, %d exchanges (%.2f ms each), %d resets",
                outcome.steps,
                outcome.exchanges,
                outcome.mean_exchange_ms,
                outcome.resets,
            )
        except ServerFailed as err:  # the server's traceback ends the run, not this worker's
            log.error("%s; leaving", err)
        except Exception:
            if self.cfg.worker_failure != "continue":
                raise
            self._leave()
        finally:
            self.heartbeat.stop()
            self.marker.close()

    def _leave(self) -> None:
        log.exception("worker %d failed; leaving the run (worker_failure=continue)", self.rank)
        with contextlib.suppress(Exception):  # the server may be gone too
            if self.loop is not None and not self.loop.send_failed():
                log.warning("could not tell the server: the exchange thread is still running")


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


def run_worker(parts: RunParts, env: DistEnv, pairs: PairGroups) -> None:
    """Ranks 1..p (k..k+p-1 with k shards): local steps on this worker's data stream, exchanges
    with the center."""
    WorkerProcess(parts, env, pairs).run()
