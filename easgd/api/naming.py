"""The algorithm an own-loop run actually ran, from the server's rule and the workers' optimizers.

``api.serve(algorithm=...)`` chooses the server's rule. With the elastic rule, the workers'
optimizers decide the name: momentum on a worker is EAMSGD (the spec's Algorithm 2), plain SGD is
EASGD (Algorithm 1). Each worker publishes a description of its optimizer in the store when it
wraps it (:func:`publish_optimizer`); the server reads them when it writes summary.json
(:func:`read_optimizers`) and names the run with :func:`algorithm_ran`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from easgd.algorithms.registry import spec_of

OPTIMIZER_KEY = "api/worker{rank}/optimizer"
"""Store key of worker ``rank``'s optimizer description."""


def describe_optimizer(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``{"type": "SGD", "momentum": 0.9}``: its class and its largest ``momentum`` over the
    parameter groups (None when it has no ``momentum`` setting: Adam, a no-op)."""
    momenta = [group["momentum"] for group in optimizer.param_groups if "momentum" in group]
    return {"type": type(optimizer).__name__, "momentum": max(momenta) if momenta else None}


def algorithm_ran(declared: str, optimizers: Sequence[dict[str, Any]]) -> str:
    """The name of what ran: with the elastic rule, eamsgd if any worker's optimizer has momentum
    > 0, easgd if every one has momentum 0; otherwise (another rule, an optimizer without a
    momentum setting, no description) ``declared``."""
    momenta = [description.get("momentum") for description in optimizers]
    if not spec_of(declared).elastic or not momenta or None in momenta:
        return declared
    return "eamsgd" if any(float(m) > 0 for m in momenta if m is not None) else "easgd"


def publish_optimizer(
    store: dist.Store | None, rank: int, optimizer: torch.optim.Optimizer
) -> None:
    """Worker ``rank``: tell the server what its optimizer is (nothing without a store)."""
    if store is not None:
        store.set(OPTIMIZER_KEY.format(rank=rank), json.dumps(describe_optimizer(optimizer)))


def read_optimizers(store: dist.Store | None, ranks: Iterable[int]) -> list[dict[str, Any]]:
    """Server: the descriptions the workers ``ranks`` published (those that did)."""
    if store is None:
        return []
    keys = [OPTIMIZER_KEY.format(rank=rank) for rank in ranks]
    return [json.loads(store.get(key)) for key in keys if store.check([key])]
