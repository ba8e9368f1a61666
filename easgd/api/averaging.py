"""Local SGD and DiLoCo for your own training loop: wrap any torch optimizer, average over a group.

No server: every rank trains and every ``comm_period`` steps all ranks of ``group`` take part in
one all-reduce of the model (:mod:`easgd.algorithms.periodic`). With ``algorithm="localsgd"`` each
rank's parameters become the average (torch's ``PeriodicModelAverager``); with ``"diloco"`` the
center takes an outer Nesterov step on the pseudo-gradient and every rank restarts from it
(DiLoCo: AdamW inside, outer rate 0.7, momentum 0.9). The inner optimizer's state (momentum
buffers, Adam moments) stays local and untouched, as in both references.

Launch with torchrun, one process per worker::

    torchrun --standalone --nproc_per_node=4 my_train.py

and in ``my_train.py``::

    torch.distributed.init_process_group("gloo")
    model = Net()
    inner = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)
    optimizer = api.AveragingOptimizer(model, inner, algorithm="diloco", comm_period=500)
    for inputs, targets in loader:
        optimizer.zero_grad()
        F.cross_entropy(model(inputs), targets).backward()
        optimizer.step()            # the inner step; every 500th also the outer round
    # optimizer.center: the outer parameters x~ (what DiLoCo evaluates)

The schedule is the references': the round follows every ``comm_period``-th inner step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from easgd.algorithms.hyperparams import check_comm_period
from easgd.algorithms.registry import spec_of
from easgd.config.algorithm import AlgorithmConfig
from easgd.roles.averaging import AveragingCenter


class AveragingOptimizer(torch.optim.Optimizer):
    """Wraps ``optimizer`` (holding ``model``'s trainable parameters) with local SGD or DiLoCo.

    The constructor broadcasts rank 0's parameters (every rank starts from the same x~).
    ``outer_learning_rate`` / ``outer_momentum``: DiLoCo's outer step (None: 0.7 and 0.9).
    ``group``: the process group to average over (None: the default group).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        algorithm: str = "diloco",
        comm_period: int = 500,
        outer_learning_rate: float | None = None,
        outer_momentum: float | None = None,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        if spec_of(algorithm, key="algorithm").family != "averaging":
            raise ValueError(
                f"AveragingOptimizer(algorithm={algorithm!r}) runs localsgd or diloco; "
                "use api.ElasticOptimizer for the elastic and DOWNPOUR families"
            )
        config = AlgorithmConfig(
            name=algorithm,
            outer_learning_rate=outer_learning_rate,
            outer_momentum=outer_momentum,
        )
        self.optimizer = optimizer
        self.param_groups = optimizer.param_groups
        self.defaults = optimizer.defaults
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.comm_period = check_comm_period(comm_period)
        self.group = group
        self.step_count = 0
        """Inner steps taken (t)."""
        self.rounds = 0
        """Rounds of averaging so far."""
        self._flat = torch.cat([p.detach().reshape(-1) for p in self.params])
        dist.broadcast(self._flat, src=dist.get_global_rank(group, 0) if group else 0, group=group)
        self._copy_to_model(self._flat)
        self.rule = AveragingCenter.of(
            config, self._flat.clone(), num_workers=dist.get_world_size(group)
        )

    @property
    def center(self) -> Tensor:
        """x~: the outer parameters after the last round (flat, live)."""
        return self.rule.center

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One inner step; after every ``comm_period``-th, the round (one all-reduce)."""
        loss = self.optimizer.step(closure)
        self.step_count += 1
        if self.step_count % self.comm_period == 0:
            self._round()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The inner optimizer's ``zero_grad``."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def _round(self) -> None:
        flat = self._flat
        torch.cat([p.detach().reshape(-1) for p in self.params], out=flat)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        self.rule.apply_sum(flat)
        self._copy_to_model(self.rule.center)  # x_i <- x~; the inner state stays as it is
        self.rounds += 1

    def _copy_to_model(self, flat: Tensor) -> None:
        offset = 0
        for param in self.params:
            param.data.copy_(flat[offset : offset + param.numel()].view_as(param))
            offset += param.numel()

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state, x~, DiLoCo's outer momentum and the counters."""
        return {
            "inner": self.optimizer.state_dict(),
            "center": self.rule.center.clone(),
            "round": {k: v.clone() for k, v in self.rule.tensors().items()},
            "step_count": self.step_count,
            "rounds": self.rounds,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (the model's parameters are the user's)."""
        self.optimizer.load_state_dict(state_dict["inner"])
        self.rule.center.copy_(state_dict["center"])
        for key, value in self.rule.tensors().items():
            value.copy_(state_dict["round"][key])
        self.step_count = int(state_dict["step_count"])
        self.rounds = int(state_dict["rounds"])

    @property
    def state(self) -> Any:  # type: ignore[override]
        """The inner optimizer's state (what ``GradScaler`` and schedulers read)."""
        return self.optimizer.state
