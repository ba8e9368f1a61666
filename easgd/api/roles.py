"""Worker roles whose x_i lives in a user's model and whose local step is a user's torch optimizer.

They are :class:`easgd.roles.WorkerRole` s, so :class:`easgd.engine.worker.WorkerLoop` drives them
exactly as it drives the built-in roles (transport, overlap, divergence-guard resets, stop signal).
What differs is where the gradient comes from: the user's ``loss.backward()`` ran before
``optimizer.step()``, at the model's current parameters. Hence ``gradient_before_exchange``:

- elastic (Algorithm 1): the gradient of step t is taken at x, the point before the elastic move;
  the exchange sends x, and the move -e is applied after the optimizer's update (so a weight decay
  inside the optimizer also sees x: g_i(x) includes weight decay, as the spec says);
- DOWNPOUR: the gradient of step t is taken at the center pulled by the exchange of step t, so
  that exchange runs at the end of step t - 1 (before the user's next forward pass).
"""

from __future__ import annotations

import torch
from torch import Tensor

from easgd.roles import WorkerRole
from easgd.roles.state import State, load_into, snapshot


class ModelParams:
    """A model's trainable parameters seen as one flat vector (the order of ``model.parameters()``)."""

    def __init__(self, params: list[Tensor]) -> None:
        if not params:
            raise ValueError(
                "the model has no trainable parameters (requires_grad=True) to average"
            )
        dtypes = {p.dtype for p in params}
        devices = {p.device for p in params}
        if len(dtypes) > 1 or len(devices) > 1:
            raise ValueError(
                f"every trainable parameter must share one dtype and one device, found "
                f"{sorted(map(str, dtypes))} on {sorted(map(str, devices))}; use model.to(...)"
            )
        self.params = params
        self.numel = sum(p.numel() for p in params)
        self.dtype = params[0].dtype
        self.device = params[0].device

    def vector(self) -> Tensor:
        """A new flat tensor holding the parameters' values."""
        with torch.no_grad():
            return torch.cat([p.detach().reshape(-1) for p in self.params])

    def views(self, flat: Tensor) -> list[Tensor]:
        """``flat`` cut into views shaped like each parameter."""
        views, offset = [], 0
        for p in self.params:
            views.append(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        return views

    def assign(self, flat: Tensor) -> None:
        """Write ``flat`` into the parameters (in place: the optimizer keeps its references)."""
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.views(flat.to(self.device, self.dtype)))

    def subtract(self, flat: Tensor) -> None:
        """parameters <- parameters - ``flat``."""
        with torch.no_grad():
            torch._foreach_sub_(self.params, self.views(flat.to(self.device, self.dtype)))


class OptimizerRole(WorkerRole):
    """Worker i with x_i in ``model_params`` and the local step ``optimizer.step()``."""

    gradient_before_exchange = True
    """True: step t's exchange follows its gradient (elastic); False: it precedes it (DOWNPOUR)."""

    def __init__(
        self, model_params: ModelParams, optimizer: torch.optim.Optimizer, *, comm_period: int
    ) -> None:
        self.model_params = model_params
        self.optimizer = optimizer
        super().__init__(model_params.vector(), comm_period=comm_period)

    @property
    def params(self) -> Tensor:
        """x_i: a copy of the model's parameters."""
        return self.model_params.vector()

    @params.setter
    def params(self, value: Tensor) -> None:
        self.model_params.assign(value)

    def gradient_point(self) -> Tensor:
        return self.params  # the user's backward already ran here

    def local_step(self, grad: object = None) -> None:
        """The user's optimizer step (``grad`` is unused: the gradients are in ``.grad``)."""
        self.optimizer.step()
        self.step += 1

    def skip_step(self) -> None:
        """Count step t_i without the optimizer's step: its gradient was taken at a point the
        server refused (this worker was reset to the center), so it is dropped."""
        self.step += 1

    def restore_step(self, step: int) -> None:
        """Resume the local step counter t_i from a checkpoint."""
        self.step = step

    def reset(self, center: Tensor) -> None:
        """Restart from ``center`` with the optimizer's state (momentum, moments) cleared."""
        self.model_params.assign(center)  # not the base's: ``params`` here is a copy
        self.optimizer.state.clear()

    def _own_tensors(self) -> dict[str, Tensor]:
        """The role's live variables besides the model's parameters, by state-dictionary key."""
        return {}

    def state_dict(self) -> State:
        """Copies of the parameters as the model stores them, the role's own variables and t_i
        (the optimizer's state is the optimizer's: :mod:`easgd.api.snapshots` saves both)."""
        return snapshot(
            {"params": self.model_params.vector(), **self._own_tensors()}, {"step": self.step}
        )

    def load_state_dict(self, state: State) -> None:
        """Restore what :meth:`state_dict` returned, into the model and the role (strict keys)."""
        params = self.model_params.vector()
        counters = load_into(
            type(self).__name__, state, {"params": params, **self._own_tensors()}, ("step",)
        )
        self.model_params.assign(params)
        self.step = counters["step"]


def lookahead_shifts(optimizer: torch.optim.Optimizer, params: list[Tensor]) -> list[Tensor | None]:
    """delta * v for each parameter of torch's Nesterov SGD (which stores y = x + delta v), else None.

    torch.optim.SGD(nesterov=True) keeps buffer b with v = -lr b, and updates the parameter as
    p <- p - lr (g + delta b'): with p = x + delta v this is exactly Algorithm 2's local step, the
    gradient being taken at p = x + delta v. So x = p - delta v = p + lr delta b, where lr is the
    group's current rate: the rate of the step about to run, so this is exact under an LR
    scheduler too (see :mod:`easgd.api.optimizer`).
    """
    nesterov = {
        id(p): group
        for group in optimizer.param_groups
        if group.get("nesterov", False)
        for p in group["params"]
    }
    shifts: list[Tensor | None] = []
    for param in params:
        group = nesterov.get(id(param))
        buffer = None if group is None else optimizer.state.get(param, {}).get("momentum_buffer")
        if group is None or buffer is None:  # not Nesterov, or before its first step (v = 0)
            shifts.append(None)
        else:
            shifts.append(-float(group["lr"]) * group["momentum"] * buffer)
    return shifts


class ElasticOptimizerRole(OptimizerRole):
    """EASGD/EAMSGD with the user's optimizer: sends x_i, receives e = alpha (x_i - center).

    With torch's Nesterov SGD the parameters hold y = x + delta v, so the payload is the corrected
    x = y - delta v, and the move -e applied to y moves x by -e and leaves v alone.
    """

    def __init__(
        self, model_params: ModelParams, optimizer: torch.optim.Optimizer, *, comm_period: int
    ) -> None:
        super().__init__(model_params, optimizer, comm_period=comm_period)
        self.pending_move = torch.zeros(
            model_params.numel, dtype=model_params.dtype, device=model_params.device
        )
        """The sum of the moves e received and not applied yet (zero: none)."""
        self._has_move = False

    def exchange_point(self) -> Tensor:
        """x_i (the parameters, less torch Nesterov's shift delta v where there is one)."""
        shifts = lookahead_shifts(self.optimizer, self.model_params.params)
        point = self.params
        if any(s is not None for s in shifts):
            for view, shift in zip(self.model_params.views(point), shifts, strict=True):
                if shift is not None:
                    view.sub_(shift)
        return point

    def outgoing(self) -> Tensor:
        return self.exchange_point()  # a new tensor: safe to send from the exchange thread

    def apply_reply(self, reply: Tensor) -> None:
        self.pending_move += reply.to(self.model_params.device, self.model_params.dtype)
        self._has_move = True

    def apply_pending_move(self) -> None:
        """x_i <- x_i - e for every e received since the last call."""
        if self._has_move:
            self.model_params.subtract(self.pending_move)
            self.pending_move.zero_()
            self._has_move = False

    def local_step(self, grad: object = None) -> None:
        super().local_step(grad)
        self.apply_pending_move()

    def reset(self, center: Tensor) -> None:
        super().reset(center)
        self.pending_move.zero_()
        self._has_move = False

    def _own_tensors(self) -> dict[str, Tensor]:
        return {"pending_move": self.pending_move}

    def load_state_dict(self, state: State) -> None:
        super().load_state_dict(state)
        self._has_move = True  # applied (exactly, if zero) after the next local step


class DownpourOptimizerRole(OptimizerRole):
    """DOWNPOUR with the user's optimizer: accumulates a_i = the sum of its local updates, pushes
    a_i and pulls the center every tau steps; the next gradient is taken at the pulled center."""

    gradient_before_exchange = False

    def __init__(
        self, model_params: ModelParams, optimizer: torch.optim.Optimizer, *, comm_period: int
    ) -> None:
        super().__init__(model_params, optimizer, comm_period=comm_period)
        self.accumulated = torch.zeros(
            model_params.numel, dtype=model_params.dtype, device=model_params.device
        )

    def outgoing(self) -> Tensor:
        return self.accumulated.clone()

    def apply_reply(self, reply: Tensor) -> None:
        self.params = reply  # x_i = center (pull); assign copies
        self.accumulated.zero_()

    def local_step(self, grad: object = None) -> None:
        before = self.params
        super().local_step(grad)
        self.accumulated += self.params - before

    def reset(self, center: Tensor) -> None:
        super().reset(center)
        self.accumulated.zero_()

    def _own_tensors(self) -> dict[str, Tensor]:
        return {"accumulated": self.accumulated}
