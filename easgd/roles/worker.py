"""What a worker does in each algorithm, apart from how messages travel.

A worker role holds worker i's variables (x_i, and v_i or a_i) and applies the rules of
:mod:`easgd.algorithms` to them in place (:mod:`easgd.algorithms.inplace`, proven equal to the pure
rules), so a step allocates nothing. It never sends anything itself: the simulator and the
distributed runtime move ``outgoing()`` to the server and hand the reply to ``incoming()``, and both
drive a step through :func:`worker_step`, so the order of exchange and gradient is written once.

Ownership: the tensors a role returns (``outgoing()``, ``gradient_point()``, ``evaluated()``) are
its live variables, valid until the role's next call; whoever keeps one longer copies it (the
overlap mode and the simulator's delayed deliveries do). ``state_dict()`` returns copies.

The local step's extras (:meth:`WorkerRole.set_local_step`): a learning-rate schedule, eta_t at
the worker's own step t_i (:mod:`easgd.algorithms.schedules`), read by each role's
``local_step``; and gradient clipping by global norm (:mod:`easgd.algorithms.clipping`), applied
in :func:`gradient_step`, which every driver's step goes through. Both default to off, and then
the step is bit for bit what it was without them.

Hooks: :meth:`WorkerRole.incoming` calls the role's ``before_reply`` observers, applies the reply
(:meth:`WorkerRole.apply_reply`, each algorithm's rule) and calls its ``after_reply`` observers,
whichever driver delivers the reply (the simulator, the runtime's worker loop, the own-loop API);
the ledger and the exchange probe subscribe there. A role overrides ``apply_reply``, never
``incoming``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import Tensor

from easgd import algorithms as alg
from easgd.algorithms import inplace
from easgd.algorithms.clipping import clip_grad_norm_
from easgd.algorithms.inplace import Grad
from easgd.algorithms.schedules import LearningRateSchedule
from easgd.roles.state import State, load_into, snapshot

GradientFn = Callable[[Tensor], tuple[float | Tensor, Grad]]
"""Maps a point (flat parameter vector) to (minibatch loss, gradient at that point). The loss may
be a 0-d device tensor (read only when reported, so a step needs no host sync); the gradient is
flat or its per-parameter pieces in order, valid until the next call."""

ReplyHook = Callable[["WorkerRole", Tensor], None]
"""Called with (role, reply) around a reply's application; the reply is only read."""

ExchangeFn = Callable[[Tensor | None], Tensor | None]
"""Sends a worker's payload to the server and returns the server's reply, or None when the reply
was already applied (or will be applied later, as in the runtime's overlap mode)."""


class WorkerRole(ABC):
    """Worker i's variables and rules for one algorithm, with the local step counter t_i."""

    def __init__(self, params: Tensor, *, comm_period: int) -> None:
        self.params = params.detach().clone()
        self.comm_period = alg.hyperparams.check_comm_period(comm_period)
        self.step = 0
        self.before_reply: list[ReplyHook] = []
        """Observers of each reply, before it is applied (the variables still as they were)."""
        self.after_reply: list[ReplyHook] = []
        """Observers of each reply, once it is applied."""
        self.schedule: LearningRateSchedule | None = None
        """eta_t at local step t_i (None: the constant eta); see :meth:`set_local_step`."""
        self.max_grad_norm: float | None = None
        """Clip each gradient to this global 2-norm before the local step (None: never)."""

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "incoming" in cls.__dict__:
            raise TypeError(
                f"{cls.__name__} overrides incoming(); implement apply_reply() instead "
                "(incoming() calls the reply hooks around it)"
            )

    def set_local_step(
        self,
        *,
        schedule: LearningRateSchedule | None = None,
        max_grad_norm: float | None = None,
    ) -> WorkerRole:
        """Use ``schedule`` (eta_t at t_i) and clip gradients to ``max_grad_norm``; returns self.

        A constant schedule without warm-up is stored as None, so that the step computes exactly
        what it does without a schedule.
        """
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm!r}")
        constant = schedule is None or (schedule.kind == "constant" and not schedule.warmup_steps)
        self.schedule = None if constant else schedule
        self.max_grad_norm = max_grad_norm
        return self

    def learning_rate_now(self, learning_rate: float) -> float:
        """eta_t of this step t_i for the base rate eta (eta itself without a schedule)."""
        if self.schedule is None:
            return learning_rate
        return self.schedule.learning_rate(self.step, learning_rate=learning_rate)

    def due(self) -> bool:
        """Whether this step starts with an exchange (t_i % tau == 0)."""
        return self.step % self.comm_period == 0

    @abstractmethod
    def outgoing(self) -> Tensor | None:
        """The payload of this exchange (None: nothing to send yet); live, valid until the next call."""

    def incoming(self, reply: Tensor) -> None:
        """Apply the server's reply to this worker's variables (``reply`` is only read), between
        the ``before_reply`` and ``after_reply`` observers."""
        if self.before_reply:
            for hook in self.before_reply:
                hook(self, reply)
        self.apply_reply(reply)
        if self.after_reply:
            for hook in self.after_reply:
                hook(self, reply)

    @abstractmethod
    def apply_reply(self, reply: Tensor) -> None:
        """This algorithm's rule for a reply (called by :meth:`incoming`; ``reply`` is only read)."""

    @abstractmethod
    def gradient_point(self) -> Tensor:
        """Where this step's stochastic gradient must be taken."""

    @abstractmethod
    def local_step(self, grad: Grad) -> None:
        """Apply the local update with the gradient taken at :meth:`gradient_point`; t_i += 1."""

    def final_outgoing(self) -> Tensor | None:
        """A last payload to flush when the worker stops (only MDOWNPOUR has one)."""
        return None

    def reset(self, center: Tensor) -> None:
        """Restart from ``center`` with cleared local state (after the server rejected our values)."""
        self.params.copy_(center)

    def evaluated(self) -> Tensor:
        """The variable to evaluate for this worker (x_i; sequential averages return z)."""
        return self.params

    def _tensors(self) -> dict[str, Tensor]:
        """The role's live tensor variables, by state-dictionary key."""
        return {"params": self.params}

    def state_dict(self) -> State:
        """Copies of every variable of the worker, for checkpoints."""
        return snapshot(self._tensors(), {"step": self.step})

    def load_state_dict(self, state: State) -> None:
        """Restore what :meth:`state_dict` returned (exactly this role's keys and shapes)."""
        counters = load_into(type(self).__name__, state, self._tensors(), ("step",))
        self.step = counters["step"]
        self._after_load()

    def _after_load(self) -> None:  # noqa: B027 - a hook; most roles derive nothing
        """Forget anything derived from the variables (a cached look-ahead)."""


class NesterovWorker(WorkerRole):
    """A worker whose local step is Nesterov momentum (plain SGD when momentum is 0).

    The look-ahead point y = x + delta * v is written into one scratch buffer, ``lookahead``:
    by default the role's own, or (``scratch``) the model's flat parameter buffer, so the gradient
    is taken there with no further copy.
    """

    def __init__(
        self,
        params: Tensor,
        *,
        comm_period: int,
        learning_rate: float,
        momentum: float,
        scratch: Tensor | None = None,
    ) -> None:
        super().__init__(params, comm_period=comm_period)
        self.velocity = torch.zeros_like(self.params)
        self.learning_rate = alg.hyperparams.check_learning_rate(learning_rate)
        self.momentum = alg.hyperparams.check_momentum(momentum)
        if scratch is not None and (
            scratch.shape != self.params.shape or scratch.dtype != self.params.dtype
        ):
            raise ValueError(
                f"scratch must match the parameters ({tuple(self.params.shape)}, "
                f"{self.params.dtype}), got {tuple(scratch.shape)}, {scratch.dtype}"
            )
        self.lookahead = torch.empty_like(self.params) if scratch is None else scratch

    def _fill_lookahead(self) -> Tensor:
        return inplace.lookahead_(
            self.lookahead, self.params, self.velocity, momentum=self.momentum
        )

    def gradient_point(self) -> Tensor:
        return self._fill_lookahead()

    def local_step(self, grad: Grad) -> None:
        inplace.nesterov_step_(
            self.params,
            self.velocity,
            grad,
            learning_rate=self.learning_rate_now(self.learning_rate),
            momentum=self.momentum,
        )
        self.step += 1

    def reset(self, center: Tensor) -> None:
        super().reset(center)
        self.velocity.zero_()

    def _tensors(self) -> dict[str, Tensor]:
        return {**super()._tensors(), "velocity": self.velocity}


class ElasticWorker(NesterovWorker):
    """EASGD (momentum 0) and EAMSGD (Algorithms 1 and 2). Sends x_i, receives e = alpha(x_i - center).

    The gradient of a step is taken at the value before the elastic move (x + delta * v): the
    look-ahead is written when the payload leaves, and the move acts on x_i only, never on v_i.

    ``params_in_scratch`` (EASGD only, with ``scratch``): x_i itself lives in ``scratch`` (the
    model's parameters), which is then also the look-ahead point (x + 0 * v = x), so no step copies
    the point. The elastic move of an exchange must then wait until the gradient at the pre-move
    point is taken: :meth:`incoming` keeps the reply (which must stay unchanged until the step)
    and :meth:`local_step` applies it first, x <- (x - e) - eta * g, the same operations in the
    same order as otherwise (:func:`easgd.algorithms.inplace.sgd_step_`). The step is plain SGD
    and writes no velocity (with momentum 0 it is never read; it stays 0). Only a driver that calls
    ``local_step`` right after the exchange and takes no :meth:`state_dict` in between may use it
    (the all-reduce loop does).
    """

    def __init__(
        self,
        params: Tensor,
        *,
        comm_period: int,
        learning_rate: float,
        momentum: float,
        scratch: Tensor | None = None,
        params_in_scratch: bool = False,
    ) -> None:
        super().__init__(
            params,
            comm_period=comm_period,
            learning_rate=learning_rate,
            momentum=momentum,
            scratch=scratch,
        )
        if params_in_scratch:
            if scratch is None or self.momentum != 0:
                raise ValueError(
                    "params_in_scratch needs a scratch buffer and momentum 0 (the look-ahead "
                    f"x + momentum * v is x only then); got momentum={self.momentum}, "
                    f"scratch={'given' if scratch is not None else None}"
                )
            scratch.copy_(self.params)
            self.params = scratch  # x_i is the look-ahead: lookahead_ is a no-op below
            self._step_buffer = torch.empty(
                min(inplace.CHUNK, scratch.numel()), dtype=scratch.dtype, device=scratch.device
            )
        self._point_before_move = False
        self._pending_move: Tensor | None = None

    def _fill_lookahead(self) -> Tensor:
        if self.lookahead is self.params:
            return self.lookahead
        return super()._fill_lookahead()

    def outgoing(self) -> Tensor:
        if self._pending_move is not None:
            raise RuntimeError("an exchange before the previous exchange's local step")
        self._fill_lookahead()
        self._point_before_move = True
        return self.params

    def apply_reply(self, reply: Tensor) -> None:
        if self.lookahead is self.params:
            self._pending_move = reply  # x_i is the gradient point: move after the gradient
            return
        inplace.apply_to_worker_(self.params, reply)

    def gradient_point(self) -> Tensor:
        if self._point_before_move:
            self._point_before_move = False
            return self.lookahead
        return self._fill_lookahead()

    def local_step(self, grad: Grad) -> None:
        if self.lookahead is not self.params:
            super().local_step(grad)
            return
        inplace.sgd_step_(
            self.params,
            grad,
            learning_rate=self.learning_rate_now(self.learning_rate),
            buffer=self._step_buffer,
            elastic_diff=self._pending_move,
        )
        self._pending_move = None
        self.step += 1

    def state_dict(self) -> State:
        if self._pending_move is not None:
            raise RuntimeError("state_dict between an exchange and its local step misses the move")
        return super().state_dict()

    def reset(self, center: Tensor) -> None:
        super().reset(center)
        self._point_before_move = False
        self._pending_move = None

    def _after_load(self) -> None:
        self._point_before_move = False
        self._pending_move = None


class DownpourWorker(WorkerRole):
    """DOWNPOUR and its averaging variants: push a_i, pull the center, then step from it."""

    def __init__(self, params: Tensor, *, comm_period: int, learning_rate: float) -> None:
        super().__init__(params, comm_period=comm_period)
        self.accumulated = torch.zeros_like(self.params)
        self.learning_rate = alg.hyperparams.check_learning_rate(learning_rate)

    def outgoing(self) -> Tensor:
        return self.accumulated

    def apply_reply(self, reply: Tensor) -> None:
        inplace.downpour_pull_(self.params, self.accumulated, reply)

    def gradient_point(self) -> Tensor:
        return self.params

    def local_step(self, grad: Grad) -> None:
        inplace.downpour_local_step_(
            self.params,
            self.accumulated,
            grad,
            learning_rate=self.learning_rate_now(self.learning_rate),
        )
        self.step += 1

    def reset(self, center: Tensor) -> None:
        super().reset(center)
        self.accumulated.zero_()

    def _tensors(self) -> dict[str, Tensor]:
        return {**super()._tensors(), "accumulated": self.accumulated}


class MDownpourWorker(WorkerRole):
    """MDOWNPOUR (tau = 1): each exchange sends the last gradient and receives the look-ahead y."""

    def __init__(self, params: Tensor) -> None:
        super().__init__(params, comm_period=1)
        self._grad = torch.empty_like(self.params)
        self._pending = False

    def set_local_step(
        self,
        *,
        schedule: LearningRateSchedule | None = None,
        max_grad_norm: float | None = None,
    ) -> WorkerRole:
        super().set_local_step(schedule=schedule, max_grad_norm=max_grad_norm)
        if self.schedule is not None:
            raise ValueError(
                "a learning-rate schedule acts on a worker's local step, and MDOWNPOUR's "
                "gradient step is the server's; use a constant rate with mdownpour"
            )
        return self

    @property
    def pending_grad(self) -> Tensor | None:
        """The gradient of the last step, not sent yet (None after a send)."""
        return self._grad if self._pending else None

    def outgoing(self) -> Tensor | None:
        grad, self._pending = self.pending_grad, False
        return grad

    def apply_reply(self, reply: Tensor) -> None:
        self.params.copy_(reply)

    def gradient_point(self) -> Tensor:
        return self.params

    def local_step(self, grad: Grad) -> None:
        inplace.gather_(self._grad, grad)
        self._pending = True
        self.step += 1

    def final_outgoing(self) -> Tensor | None:
        return self.outgoing()

    def state_dict(self) -> State:
        state = super().state_dict()
        if self._pending:  # the gradient the next exchange sends: part of a consistent snapshot
            state["pending_grad"] = self._grad.detach().clone()
        return state

    def load_state_dict(self, state: State) -> None:
        pending = state.get("pending_grad")
        super().load_state_dict({k: v for k, v in state.items() if k != "pending_grad"})
        if isinstance(pending, Tensor):
            self._grad.copy_(pending)
            self._pending = True

    def reset(self, center: Tensor) -> None:
        super().reset(center)
        self._pending = False

    def _after_load(self) -> None:
        self._pending = False


class SequentialWorker(NesterovWorker):
    """SGD, MSGD (Nesterov), ASGD (Polyak average) and MVASGD (moving average), p = 1, no server."""

    def __init__(
        self,
        params: Tensor,
        *,
        learning_rate: float,
        momentum: float,
        average: bool,
        average_rate: float | None,
        scratch: Tensor | None = None,
    ) -> None:
        super().__init__(
            params,
            comm_period=1,
            learning_rate=learning_rate,
            momentum=momentum,
            scratch=scratch,
        )
        self.average: Tensor | None = self.params.clone() if average else None
        self.average_rate = average_rate

    def due(self) -> bool:
        return False

    def outgoing(self) -> Tensor | None:  # pragma: no cover - never due
        raise RuntimeError("sequential algorithms never exchange")

    def apply_reply(self, reply: Tensor) -> None:  # pragma: no cover - never due
        raise RuntimeError("sequential algorithms never exchange")

    def local_step(self, grad: Grad) -> None:
        super().local_step(grad)
        if self.average is not None:
            rate = alg.average_rate(self.step, constant_rate=self.average_rate)
            inplace.running_average_(self.average, self.params, rate=rate)

    def evaluated(self) -> Tensor:
        return self.params if self.average is None else self.average

    def _tensors(self) -> dict[str, Tensor]:
        tensors = super()._tensors()
        if self.average is not None:
            tensors["average"] = self.average
        return tensors


def exchange_if_due(role: WorkerRole, exchange: ExchangeFn) -> None:
    """The exchange that starts step t_i when t_i % tau == 0: send ``outgoing()``, apply the reply."""
    if role.due():
        reply = exchange(role.outgoing())
        if reply is not None:
            role.incoming(reply)


def gradient_step(role: WorkerRole, gradient: GradientFn) -> float | Tensor:
    """The second half of step t_i: the gradient at the role's gradient point, then its local
    step. Returns the loss. Drivers that time the exchange apart (the simulator's cost clock, a
    sequential baseline that never exchanges) call the two halves themselves, in this order.

    Elastic workers take the gradient at the point from before the elastic move (the role keeps
    it); DOWNPOUR workers at the center they just pulled; MDOWNPOUR at the look-ahead received.
    With ``role.max_grad_norm`` the gradient (weight decay included) is clipped to that global
    norm here, the one place every driver's step goes through; the role's ``local_step`` then
    applies eta_t of its step t_i.
    """
    loss, grad = gradient(role.gradient_point())
    apply_gradient(role, grad)
    return loss


def apply_gradient(role: WorkerRole, grad: Grad) -> None:
    """The local step of :func:`gradient_step` once the gradient at ``role.gradient_point()`` is
    known: clipped to ``role.max_grad_norm`` (when set), then the role's ``local_step``.

    A driver that takes several workers' gradients in one batched call (the simulator's batched
    path, :mod:`easgd.sim.batched`) reads each role's gradient point once, computes, and hands
    each role its row here; ``grad`` may be clipped in place.
    """
    if role.max_grad_norm is not None:
        clip_grad_norm_(grad, max_norm=role.max_grad_norm)
    role.local_step(grad)


def worker_step(role: WorkerRole, gradient: GradientFn, exchange: ExchangeFn) -> float | Tensor:
    """One step t_i of a worker: the exchange when due, then the gradient step. Returns the loss."""
    exchange_if_due(role, exchange)
    return gradient_step(role, gradient)
