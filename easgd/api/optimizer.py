"""The worker side of the own-loop API: any torch optimizer, wrapped so ``step()`` runs Algorithm 1.

``ElasticOptimizer(model, optimizer, session)`` is a ``torch.optim.Optimizer`` (in the manner of
torch's ``PostLocalSGDOptimizer``): ``zero_grad``, ``param_groups``, ``state_dict`` and
``GradScaler.step`` work as usual. Each ``step()`` is one local step t_i of the algorithm the
server runs, in the spec's order, driven by the same :class:`~easgd.engine.worker.WorkerLoop`
as ``easgd.train`` (transport, overlap, divergence-guard resets, stop signal), with heartbeats.

Example::

    optimizer = api.ElasticOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.05), session)
    for inputs, targets in loader:
        optimizer.zero_grad()
        F.cross_entropy(model(inputs), targets).backward()
        optimizer.step()               # gradient at x, then the exchange when due, then the step
        if optimizer.should_stop:      # the server's stop rule (wall clock, target error)
            break
    optimizer.close()

Learning-rate schedulers (``torch.optim.lr_scheduler.*(optimizer)``) work on the wrapper, and
EAMSGD stays exact under them. torch's Nesterov SGD keeps y = x + delta v in the parameters and a
buffer b whose velocity is v = -lr b for the lr of the step about to run; the exchange of step t
runs inside :meth:`ElasticOptimizer.step`, right before that step, so it sends
x = y + lr_t delta b with the lr the step then uses, and the move -e lands on x, never on v
(``tests/test_own_loop_schedule.py`` checks it against the equations with the rate changing at
every step). What the user's optimizer does at a rate change is its own: torch rescales the
velocity, v -> (lr_t / lr_{t-1}) v with y fixed, so x shifts by
delta (1 - lr_t / lr_{t-1}) v, and this worker's trajectory is not the spec's Algorithm 2 with
eta_t, where v keeps the rate it was taken with (what ``easgd.train``'s ``optim.lr_schedule``
does). At a change lr -> r lr the two forms hold the same y; their velocities then differ by
delta^k (1 - r) v after k more steps, and (the gradient's own change aside) their x by
delta^2 / (1 - delta) (1 - r) v in the end (about 98 (1 - r) v at delta = 0.99): the spec's form
coasts on at the old rate's speed. At a constant rate the two are the same.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from easgd.algorithms.hyperparams import check_comm_period
from easgd.algorithms.registry import spec_of
from easgd.api.members import SlotMember
from easgd.api.naming import publish_optimizer
from easgd.api.roles import DownpourOptimizerRole, ElasticOptimizerRole, ModelParams, OptimizerRole
from easgd.api.session import Session
from easgd.api.snapshots import WorkerPart, restore
from easgd.comm.compression import Compression
from easgd.comm.groups import SERVER_RANK, LaunchError
from easgd.comm.heartbeat import LoopHeartbeat
from easgd.comm.message import ServerRejected
from easgd.comm.transport import PairTransport, pair_transport
from easgd.engine.worker import WorkerLoop, WorkerOutcome, handshake


def _no_gradient(point: Tensor) -> tuple[float, Tensor]:  # pragma: no cover - never called
    raise RuntimeError("the own-loop API takes its gradients from the user's loss.backward()")


def trainable_params(model: nn.Module) -> list[Tensor]:
    """The parameters that are averaged: ``model.parameters()`` with requires_grad, in order."""
    return [p for p in model.parameters() if p.requires_grad]


def _check_optimizer_covers_model(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = {id(p) for p in trainable_params(model)}
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in held]
    if missing:
        raise ValueError(
            f"the optimizer does not hold the model's trainable parameters {missing[:5]}; build it "
            "from model.parameters() (or set requires_grad=False on what it must not train)"
        )
    if held - trainable:
        raise ValueError(
            "the optimizer holds parameters that are not trainable parameters of the model; "
            "build it from model.parameters() of the model passed to ElasticOptimizer"
        )


def _compression(run: dict[str, Any], elastic: bool, numel: int) -> Compression | None:
    """The compression ``api.serve`` announced in the run description (None: float32)."""
    name = str(run.get("compression", "none"))
    if name == "none":
        return None
    return Compression(name, bool(run.get("error_feedback", True)), elastic, numel)


class ElasticOptimizer(torch.optim.Optimizer):
    """Wraps ``optimizer`` (which must hold every trainable parameter of ``model``) on a worker.

    ``comm_period`` is tau; ``overlap`` runs exchanges in a background thread (elastic only, as in
    ``easgd.train``). The algorithm is the server's (``api.serve(algorithm=...)``). ``transport``
    replaces the session's pair with the server (tests). The constructor sets the model's
    parameters to the center; when the server snapshots the run (``api.serve(run_dir=...)``) it
    instead restores this worker's part of the committed snapshot the server resumed from (model
    parameters and buffers, the optimizer's state, t_i: :attr:`resumed_step`), and saves its
    part of every later snapshot itself.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        session: Session,
        *,
        comm_period: int = 10,
        overlap: bool = False,
        transport: PairTransport | None = None,
    ) -> None:
        model_params = ModelParams(trainable_params(model))
        run = self._checked_run(model, optimizer, session, model_params, comm_period, overlap)
        publish_optimizer(session.store, session.env.rank, optimizer)  # the summary's name
        algorithm = str(run.get("algorithm", "easgd"))
        spec = spec_of(algorithm)
        self.optimizer = optimizer
        self.param_groups = optimizer.param_groups
        self.defaults = optimizer.defaults
        self.algorithm = algorithm
        self.member: SlotMember | None = None
        """This worker's hold on its slot (elastic membership; None: a fixed roster)."""
        transport = transport or self._link(session, run, model_params, spec.elastic)
        # with members coming and going a snapshot is the server's state alone
        part = WorkerPart.of_run(run, session.env.rank) if self.member is None else None
        saved = part.load() if part is not None else None
        role_type = ElasticOptimizerRole if spec.elastic else DownpourOptimizerRole
        self.role: OptimizerRole = self._join(
            transport, model_params, role_type, comm_period, saved
        )
        if saved is not None:  # the run's committed snapshot: model, optimizer and t_i
            restore(self.role, model, saved)
        self.resumed_step = self.role.step
        """t_i this worker resumed at: from the run's committed snapshot, or (elastic
        membership) the step its slot had reached (0: a fresh start)."""
        device = model_params.device
        self.loop = WorkerLoop(
            self.role,
            transport if self.member is None else self.member.link(algorithm, overlap=overlap),
            _no_gradient,
            steps=0,
            overlap=overlap,
            to_device=lambda t: t.to(device, non_blocking=True),
            snapshots=part.snapshots(self.role, model) if part is not None else None,
        )
        if self.member is not None:
            self.member.attach(self.loop, algorithm)
        self._heartbeat = (
            LoopHeartbeat(session.store, session.env.rank) if session.store is not None else None
        )
        if self._heartbeat is not None:
            self._heartbeat.start()
        self._fresh_gradient = False
        self._hooks = [
            p.register_post_accumulate_grad_hook(self._saw_gradient) for p in model_params.params
        ]
        self._closed = False
        self.outcome: WorkerOutcome | None = None
        """The worker's figures, set by :meth:`close`."""
        self.loop.start()
        if not self.role.gradient_before_exchange:
            self.loop.exchange_if_due()  # DOWNPOUR's t = 0 pull, before the first gradient

    @classmethod
    def _checked_run(
        cls,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        session: Session,
        model_params: ModelParams,
        comm_period: int,
        overlap: bool,
    ) -> dict[str, Any]:
        """The server's run description, once every argument is checked against it."""
        if session.is_server:
            raise LaunchError(
                "ElasticOptimizer runs on workers (rank >= 1); rank 0 calls api.serve"
            )
        if isinstance(optimizer, ElasticOptimizer):
            raise ValueError("the optimizer is already an ElasticOptimizer; wrap it once")
        _check_optimizer_covers_model(model, optimizer)
        run = session.read_run()
        cls._check_same_model(run, model_params)
        spec = spec_of(str(run.get("algorithm", "easgd")))
        spec.check_own_loop("ElasticOptimizer")
        try:
            check_comm_period(comm_period)
        except ValueError as err:
            raise ValueError(f"ElasticOptimizer: {err}") from None
        spec.check_overlap(overlap, key="overlap=True")
        return run

    def _link(
        self, session: Session, run: dict[str, Any], model_params: ModelParams, elastic: bool
    ) -> PairTransport:
        """The link to the server: over the session's pair group, or (elastic membership) over
        the group of the slot this worker claims now."""
        compression = _compression(run, elastic, model_params.numel)
        if session.membership == "elastic":
            numel, dtype = model_params.numel, model_params.dtype
            self.member = SlotMember(
                session, run, numel=numel, dtype=dtype, compression=compression
            )
            return self.member.transport
        return pair_transport(
            compression,
            worker=True,
            peer=SERVER_RANK,
            group=session.groups[session.env.rank],
            numel=model_params.numel,
            dtype=model_params.dtype,
        )

    def _join(
        self,
        transport: PairTransport,
        model_params: ModelParams,
        role_type: type[OptimizerRole],
        comm_period: int,
        saved: dict[str, Any] | None,
    ) -> OptimizerRole:
        """Say HELLO (with the resumed step), set the model to the center, build the role
        (elastic membership: at the step the slot had reached)."""
        step = int(saved["role"]["step"]) if saved is not None else 0
        try:
            if self.member is not None:
                step, center = self.member.hello()
            else:
                center = handshake(transport, step=step)
        except ServerRejected as err:
            raise ValueError(f"{err}; build the same model on every rank") from None
        model_params.assign(center)
        role = role_type(model_params, self.optimizer, comm_period=comm_period)
        if self.member is not None:
            role.restore_step(step)
        return role

    @staticmethod
    def _check_same_model(run: dict[str, Any], model_params: ModelParams) -> None:
        numel, dtype = run.get("numel"), run.get("dtype")
        if numel is not None and numel != model_params.numel:
            raise ValueError(
                f"this worker's model has {model_params.numel} trainable parameters but the "
                f"server's has {numel}; build the same model (same architecture and "
                "requires_grad flags) on every rank"
            )
        if dtype is not None and dtype != str(model_params.dtype):
            raise ValueError(
                f"this worker's parameters are {model_params.dtype} but the server's are {dtype}; "
                "build the model in the same dtype on every rank (autocast is fine)"
            )

    def _saw_gradient(self, param: Tensor) -> None:
        self._fresh_gradient = True

    @property
    def state(self) -> Any:  # type: ignore[override]
        """The wrapped optimizer's state (momentum buffers, moments)."""
        return self.optimizer.state

    @property
    def should_stop(self) -> bool:
        """True once the server asked the workers to stop (its wall-clock or target rule)."""
        return self.loop.stop_requested

    @property
    def local_step_count(self) -> int:
        """t_i: local steps taken so far (resumed by :meth:`load_state_dict`)."""
        return self.role.step

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As the wrapped optimizer's."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(
        self, closure: Callable[[], Any] | None = None, *, loss: Tensor | float | None = None
    ) -> Any:
        """One local step t_i: the gradient (already in ``.grad``, or from ``closure``), then the
        exchange when t_i % tau == 0, then the wrapped optimizer's step (DOWNPOUR: the step, then
        the push/pull that precedes the next gradient).

        ``loss`` (or the closure's) is reported to the server's TensorBoard as the train loss.
        """
        if self._closed:
            raise RuntimeError("optimizer.step() after optimizer.close()")
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._fresh_gradient:
            raise RuntimeError(
                "optimizer.step() was called without a new gradient: call loss.backward() "
                "(after optimizer.zero_grad()) before every optimizer.step()"
            )
        self._fresh_gradient = False
        started = time.perf_counter()
        if self.role.gradient_before_exchange:
            resets = self.loop.resets
            self.loop.exchange_if_due()
            if self.loop.resets == resets:
                self.role.local_step()
            else:  # reset to the center: the gradient belongs to the refused point, drop it
                self.role.skip_step()
        else:
            self.role.local_step()
            self.loop.exchange_if_due()
        # an unknown loss reads NaN on the server's TensorBoard, not a made-up 0; a tensor stays
        # on its device until an exchange reports it (no host sync per step)
        reported = loss.detach() if isinstance(loss, Tensor) else loss
        self.loop.end_step(math.nan if reported is None else reported, started)
        if self._heartbeat is not None:  # liveness comes from the loop's own progress
            self._heartbeat.beat()
            self._heartbeat.check()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state and this worker's (t_i; DOWNPOUR's a_i) for ``torch.save``.

        The parameters x_i are in the model's own state_dict. Not needed for restarts under
        ``api.serve(run_dir=...)`` (the run's snapshots hold both); for exporting a worker.
        """
        local: dict[str, Any] = {"step": self.role.step, "algorithm": self.algorithm}
        if isinstance(self.role, DownpourOptimizerRole):
            local["accumulated"] = self.role.accumulated.clone()
        return {"optimizer": self.optimizer.state_dict(), "easgd": local}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (after the model's own load_state_dict)."""
        local = state_dict.get("easgd")
        if local is None or "optimizer" not in state_dict:
            raise ValueError(
                "not an ElasticOptimizer state_dict (no 'easgd' entry); save optimizer.state_dict() "
                "of the wrapper, not of the optimizer it wraps"
            )
        if local.get("algorithm") != self.algorithm:
            raise ValueError(
                f"the checkpoint was written for {local.get('algorithm')!r} but the server runs "
                f"{self.algorithm!r}; resume with the same algorithm or start a fresh run"
            )
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.role.restore_step(int(local["step"]))
        if isinstance(self.role, DownpourOptimizerRole):
            self.role.accumulated.copy_(local["accumulated"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Not supported: the averaged vector is fixed when the worker joins."""
        raise ValueError("ElasticOptimizer cannot add parameter groups after joining the run")

    def close(self) -> WorkerOutcome:
        """Tell the server this worker is done (waits for an exchange in flight); returns figures."""
        if self.outcome is not None:
            return self.outcome
        self._closed = True
        try:
            self.outcome = self.loop.finish()
            if isinstance(self.role, ElasticOptimizerRole):
                self.role.apply_pending_move()  # an overlapped reply that arrived at the end
            if self.member is not None:
                self.member.finish()
        finally:
            self._release()
        return self.outcome

    def abandon(self) -> None:
        """Tell the server this worker failed and leaves (for an exception in the user's loop)."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):  # the server may be gone too
            self.loop.stop_exchange_thread()  # so that FAILED cannot race an exchange in flight
            self.loop.send_failed()
        self._release()

    def _release(self) -> None:
        for hook in self._hooks:
            hook.remove()
        if self._heartbeat is not None:
            self._heartbeat.stop()
        if self.member is not None:
            self.member.close()

    def __enter__(self) -> ElasticOptimizer:
        return self

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        if kind is None:
            self.close()
        else:
            self.abandon()
