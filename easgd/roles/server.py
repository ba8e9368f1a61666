"""What the parameter server does with each message, apart from how messages travel.

A server role holds the center (and MDOWNPOUR's velocity v~, or the average z) and answers one
worker message with :meth:`ServerRole.handle`, updating its variables in place
(:mod:`easgd.algorithms.inplace`, one pass over memory). The caller serialises calls (the runtime
holds a lock): the conservation of center + sum of workers depends on it.

Ownership: a reply is written into ``out`` (the caller's per-worker buffer, e.g. the payload's own
receive buffer) or into a new tensor, never returned as an alias of the center, so it stays
consistent after the lock is released. ``evaluated()`` is live (copy it under the lock);
``state_dict()`` returns copies.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import Tensor

from easgd import algorithms as alg
from easgd.algorithms import fused, inplace
from easgd.algorithms.fused import FusedElasticUpdate
from easgd.roles.state import State, load_into, snapshot


class UpdateRefused(ValueError):
    """An update's norm exceeded the limit; the center was left untouched."""


class ServerRole(ABC):
    """The center variable and the server-side rule of one algorithm."""

    def __init__(self, center: Tensor) -> None:
        self.center = center.detach().clone()
        self.updates = 0
        """Server clock s: how many center updates so far."""

    @abstractmethod
    def handle(
        self,
        worker: int,
        payload: Tensor | None,
        *,
        out: Tensor | None = None,
        max_update_norm: float | None = None,
    ) -> Tensor:
        """Apply one worker's payload and return the reply for that worker.

        The reply is written into ``out`` when given (it may be ``payload`` itself: the payload
        is read before it is overwritten), else into a new tensor. ``max_update_norm`` is only
        enforced here by roles whose :meth:`update_norm` needs the center (raises
        :class:`UpdateRefused`, center untouched); the others are checked before the call.
        """

    @abstractmethod
    def update_norm(self, payload: Tensor) -> float | None:
        """Norm of the change ``handle(payload)`` would make, from the payload alone (one read
        pass, so it also reveals a non-finite payload); None when it depends on the center."""

    def elastic_distance(self, reply: Tensor) -> float | None:
        """||x_i - center|| at an exchange, from its reply (None: not an elastic rule)."""
        return None

    synchronous_round = False
    """Whether :meth:`handle_round` is this rule's synchronous form (the elastic family's)."""

    def handle_delayed(
        self, worker: int, payload: Tensor | None, read: Tensor
    ) -> tuple[Tensor, Callable[[], object]]:
        """A delayed channel (the simulator's ``read_staleness`` / ``push_delay``): the reply
        computed from ``read`` (a stale copy of the center) and the update, to be delivered later."""
        raise ValueError(
            "communication delay is simulated for the elastic and DOWNPOUR families, "
            f"not {type(self).__name__}"
        )

    def handle_round(self, payloads: list[Tensor]) -> list[Tensor]:
        """A synchronous round: every payload reads the same center, then one update."""
        raise ValueError(f"{type(self).__name__} has no synchronous round")

    def compile_update(self, *, background: bool = True, part_values: int | None = None) -> None:
        """Build a compiled one-pass update where the rule has one (:mod:`easgd.algorithms.fused`),
        for the whole center and for parts of ``part_values`` values (the pipelined exchange's);
        ``handle`` stays eager until it is ready. Called by the runtime's server at its start."""
        return None  # no compiled form: the eager update serves

    def reply_center(self, out: Tensor | None = None) -> Tensor:
        """A copy of the center (into ``out`` when given): the reply to a refused update."""
        return self.center.clone() if out is None else out.copy_(self.center)

    def evaluated(self) -> Tensor:
        """The variable that is tested and checkpointed: the center (z for averaging variants)."""
        return self.center

    def _tensors(self) -> dict[str, Tensor]:
        """The role's live tensor variables, by state-dictionary key."""
        return {"center": self.center}

    def state_dict(self) -> State:
        """Copies of every server variable, for checkpoints."""
        return snapshot(self._tensors(), {"updates": self.updates})

    def load_state_dict(self, state: State) -> None:
        """Restore what :meth:`state_dict` returned (exactly this role's keys and shapes)."""
        self.updates = load_into(type(self).__name__, state, self._tensors(), ("updates",))[
            "updates"
        ]


class ElasticServer(ServerRole):
    """EASGD/EAMSGD: receives x_i, computes e = alpha (x_i - center), applies it, replies e."""

    def __init__(self, center: Tensor, *, moving_rate: float) -> None:
        super().__init__(center)
        self.moving_rate = alg.hyperparams.check_moving_rate(moving_rate)
        self.fused: FusedElasticUpdate | None = None
        """The compiled update (:meth:`compile_update`; None: eager)."""
        self.fused_part: FusedElasticUpdate | None = None
        """The compiled update of one part (:meth:`update_part`; None: eager)."""

    def compile_update(self, *, background: bool = True, part_values: int | None = None) -> None:
        if not (
            fused.compile_enabled()
            and self.center.dtype == torch.float32
            and self.center.device.type == "cpu"
        ):
            return
        numel, rate = self.center.numel(), self.moving_rate
        if self.fused is None and numel >= fused.FUSED_MIN_VALUES:
            self.fused = FusedElasticUpdate(numel, moving_rate=rate, background=background)
        if (
            self.fused_part is None
            and part_values is not None
            and fused.FUSED_MIN_VALUES <= part_values < numel
        ):
            self.fused_part = FusedElasticUpdate(
                part_values, moving_rate=rate, background=background
            )

    def handle(
        self,
        worker: int,
        payload: Tensor | None,
        *,
        out: Tensor | None = None,
        max_update_norm: float | None = None,
    ) -> Tensor:
        if payload is None:
            raise ValueError(f"worker {worker} sent no parameters to an elastic exchange")
        reply = torch.empty_like(self.center) if out is None else out
        if max_update_norm is None:
            if self.fused is None or not self.fused(self.center, payload, reply):
                inplace.elastic_update_(self.center, payload, reply, moving_rate=self.moving_rate)
            self.updates += 1
            return reply
        return self._two_pass(payload, reply, max_update_norm, None)

    def handle_quantized(
        self,
        worker: int,
        payload: Tensor,
        quantize: Callable[[Tensor], object],
        *,
        out: Tensor,
        max_update_norm: float | None = None,
    ) -> Tensor:
        """:meth:`handle` for a rule whose reply is an increment both ends apply (the elastic
        difference): ``quantize(reply)`` replaces the reply in place by its decoded value before
        the center moves by it, so worker and server apply the same bits
        (:mod:`easgd.roles.links`). Rules that reply a state are compressed outside the role."""
        return self._two_pass(payload, out, max_update_norm, quantize)

    def _two_pass(
        self,
        payload: Tensor,
        reply: Tensor,
        max_update_norm: float | None,
        quantize: Callable[[Tensor], object] | None,
    ) -> Tensor:
        """e first (and its norm, checked), the center after it (guarded or quantized)."""
        norm = inplace.elastic_difference_(
            reply, payload, self.center, moving_rate=self.moving_rate
        )
        if max_update_norm is not None and not norm <= max_update_norm:
            raise UpdateRefused(
                "non-finite values" if not math.isfinite(norm)
                else f"update norm {norm:.3g} > max_update_norm {max_update_norm:g}"
            )  # fmt: skip
        if quantize is not None:
            quantize(reply)
        self.center.add_(reply)
        self.updates += 1
        return reply

    def update_norm(self, payload: Tensor) -> float | None:
        return None  # alpha ||x_i - center||: measured during the update (see handle)

    # -- the same exchange in parts (the pipelined exchange: easgd.engine.server) ---------------
    def difference_part(self, out: Tensor, payload: Tensor, part: slice) -> float:
        """out <- e = alpha (x_i - center) over the values ``part`` of the center (``out`` may be
        ``payload``: that part of x_i); returns ||e||^2 of the part. The center is untouched:
        :meth:`apply_part` moves it once every part has been checked."""
        diff = torch.sub(payload, self.center[part], out=out).mul_(self.moving_rate)
        return float(torch.linalg.vector_norm(diff)) ** 2

    def apply_part(self, elastic_diff: Tensor, part: slice) -> None:
        """center[part] <- center[part] + e[part]; :meth:`count_update` after the last part."""
        self.center[part].add_(elastic_diff)

    def update_part(self, payload: Tensor, part: slice) -> None:
        """:meth:`handle` without a norm limit on the values ``part``: payload <- e there and the
        center moves by it (in one compiled pass where it is built); :meth:`count_update` after
        the last part."""
        center = self.center[part]
        if self.fused_part is None or not self.fused_part(center, payload, payload):
            inplace.elastic_update_(center, payload, payload, moving_rate=self.moving_rate)

    def count_update(self) -> None:
        """One update made of parts is complete."""
        self.updates += 1

    def elastic_distance(self, reply: Tensor) -> float | None:
        return float(reply.norm()) / self.moving_rate  # e = alpha (x_i - center)

    def apply(self, elastic_diff: Tensor) -> None:
        """center <- center + e (an elastic difference computed earlier)."""
        self.center.add_(elastic_diff)
        self.updates += 1

    def handle_delayed(
        self, worker: int, payload: Tensor | None, read: Tensor
    ) -> tuple[Tensor, Callable[[], object]]:
        if payload is None:
            raise ValueError(f"worker {worker} sent no parameters to an elastic exchange")
        # e = alpha (x_i - read): the worker moves by it now, the center when it arrives
        diff = alg.elastic_difference(payload, read, moving_rate=self.moving_rate)
        return diff, lambda: self.apply(diff)

    synchronous_round = True

    def handle_round(self, payloads: list[Tensor]) -> list[Tensor]:
        # every worker reads the same center; x~ += sum_i e_i as one addition of the summed
        # differences: the spec's equation and the replicated-center form's order
        # (easgd.engine.allreduce), bit for bit
        read = self.center.clone()
        diffs = [alg.elastic_difference(x, read, moving_rate=self.moving_rate) for x in payloads]
        if diffs:
            self.apply(sum(diffs[1:], diffs[0]))
        return diffs


class DownpourServer(ServerRole):
    """DOWNPOUR (+ ADOWNPOUR / MVADOWNPOUR average z): adds a_i to the center, replies the center."""

    def __init__(
        self, center: Tensor, *, average: bool = False, average_rate: float | None = None
    ) -> None:
        super().__init__(center)
        self.average: Tensor | None = self.center.clone() if average else None
        self.average_rate = average_rate

    def handle_delayed(
        self, worker: int, payload: Tensor | None, read: Tensor
    ) -> tuple[Tensor, Callable[[], object]]:
        if payload is None:
            raise ValueError(f"worker {worker} sent no accumulated update to DOWNPOUR")
        sent = payload.clone()  # the worker zeroes its accumulation in place on the reply
        return read.clone(), lambda: self.handle(worker, sent)

    def handle(
        self,
        worker: int,
        payload: Tensor | None,
        *,
        out: Tensor | None = None,
        max_update_norm: float | None = None,
    ) -> Tensor:
        if payload is None:
            raise ValueError(f"worker {worker} sent no accumulated update to DOWNPOUR")
        reply = torch.empty_like(self.center) if out is None else out
        inplace.downpour_push_(self.center, payload, reply)
        self.updates += 1
        if self.average is not None:
            rate = alg.average_rate(self.updates, constant_rate=self.average_rate)
            inplace.running_average_(self.average, self.center, rate=rate)
        return reply

    def update_norm(self, payload: Tensor) -> float:
        return float(torch.linalg.vector_norm(payload))

    def evaluated(self) -> Tensor:
        return self.center if self.average is None else self.average

    def _tensors(self) -> dict[str, Tensor]:
        tensors = super()._tensors()
        if self.average is not None:
            tensors["average"] = self.average
        return tensors


class MDownpourServer(ServerRole):
    """MDOWNPOUR: Nesterov momentum on the server; receives g(y), replies the new look-ahead y."""

    def __init__(self, center: Tensor, *, learning_rate: float, momentum: float) -> None:
        super().__init__(center)
        self.velocity = torch.zeros_like(self.center)
        self.learning_rate = alg.hyperparams.check_learning_rate(learning_rate)
        self.momentum = alg.hyperparams.check_momentum(momentum)

    def handle(
        self,
        worker: int,
        payload: Tensor | None,
        *,
        out: Tensor | None = None,
        max_update_norm: float | None = None,
    ) -> Tensor:
        reply = torch.empty_like(self.center) if out is None else out
        if payload is None:
            return inplace.lookahead_(reply, self.center, self.velocity, momentum=self.momentum)
        inplace.mdownpour_server_step_(
            self.center,
            self.velocity,
            payload,
            reply,
            learning_rate=self.learning_rate,
            momentum=self.momentum,
        )
        self.updates += 1
        return reply

    def update_norm(self, payload: Tensor) -> float:
        return self.learning_rate * float(torch.linalg.vector_norm(payload))

    def _tensors(self) -> dict[str, Tensor]:
        return {**super()._tensors(), "velocity": self.velocity}
