"""The center cut into k contiguous slices, one server role per slice: what k shard ranks compute.

Every server rule of the spec is elementwise (the elastic move, DOWNPOUR's push and its averages,
MDOWNPOUR's momentum step), so k roles on slices, each answering its slice of a message, give the
unsharded role's center and replies element for element. The averaging rate a_s depends on the
server clock s, which stays equal on every shard because every exchange reaches every shard.
What is not elementwise is a norm over the whole update (``max_update_norm``): it composes as
sqrt(sum of squared slice norms), but a shard rank sees only its slice, so the runtime refuses
``max_update_norm`` with shards > 1 rather than decide on part of the update (non-finite values
are refused on every shard together: the worker-side transport poisons every slice, see
:class:`easgd.comm.sharded.ShardedTransport`).

``ShardedServer`` composes the k slice roles in one process, so the simulator can drive a
sharded center and be compared with an unsharded one.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from easgd.roles.server import ServerRole


def shard_bounds(numel: int, shards: int) -> list[tuple[int, int]]:
    """[lo, hi) of each of ``shards`` contiguous slices of ``numel`` values (sizes differ by <= 1)."""
    if shards < 1 or shards > numel:
        raise ValueError(
            f"server.shards={shards} must be between 1 and the parameter count ({numel})"
        )
    base, extra = divmod(numel, shards)
    bounds, lo = [], 0
    for index in range(shards):
        hi = lo + base + (1 if index < extra else 0)
        bounds.append((lo, hi))
        lo = hi
    return bounds


class ShardedServer(ServerRole):
    """k slice roles acting as one server role (in-process model of k shard ranks)."""

    def __init__(self, center: Tensor, shards: int, make_role: Callable[[Tensor], ServerRole]):
        super().__init__(center)
        self.bounds = shard_bounds(center.numel(), shards)
        self.shards = [make_role(self.center[lo:hi].clone()) for lo, hi in self.bounds]

    def _slices(self, payload: Tensor) -> list[Tensor]:
        return [payload[lo:hi] for lo, hi in self.bounds]

    def handle(
        self,
        worker: int,
        payload: Tensor | None,
        *,
        out: Tensor | None = None,
        max_update_norm: float | None = None,
    ) -> Tensor:
        if max_update_norm is not None:
            raise ValueError(
                "max_update_norm is a norm over the whole update: see easgd.roles.sharded"
            )
        parts: list[Tensor | None] = (
            [None] * len(self.shards) if payload is None else list(self._slices(payload))
        )
        replies = [role.handle(worker, part) for role, part in zip(self.shards, parts, strict=True)]
        reply = torch.cat(replies) if out is None else torch.cat(replies, out=out)
        self.center = torch.cat([role.center for role in self.shards])
        self.updates = self.shards[0].updates
        return reply

    def update_norm(self, payload: Tensor) -> float | None:
        norms = [r.update_norm(s) for r, s in zip(self.shards, self._slices(payload), strict=True)]
        if any(norm is None for norm in norms):
            return None  # measured during the update by these roles
        return math.sqrt(sum(norm**2 for norm in norms if norm is not None))

    def evaluated(self) -> Tensor:
        return torch.cat([role.evaluated() for role in self.shards])
