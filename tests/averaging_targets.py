"""Targets of the multi-process local SGD / DiLoCo tests (run in spawned gloo ranks, so they live
at module level here, importable by the child processes)."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def _batches(rank: int, steps: int) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(100 + rank)
    return [
        (torch.randn(16, 5, generator=generator), torch.randint(0, 3, (16,), generator=generator))
        for _ in range(steps)
    ]


def _flat(params: Any) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, batches: list) -> None:
    for inputs, targets in batches:
        optimizer.zero_grad()
        F.cross_entropy(model(inputs), targets).backward()
        optimizer.step()


def _periodic_model_averager_run(
    model: nn.Module, optimizer: torch.optim.Optimizer, batches: list, period: int
) -> Tensor:
    """torch's local SGD on the default group: average after every period-th step (after steps
    period - 1, 2 period - 1, ...: PeriodicModelAverager's warm-up skips the first period - 1)."""
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

    averager = PeriodicModelAverager(period=period, warmup_steps=period - 1)
    for batch in batches:
        _train(model, optimizer, [batch])
        averager.average_parameters(model.parameters())
    return _flat(model.parameters())


def digits_model_and_batches(
    rank: int, steps: int
) -> tuple[nn.Module, list[tuple[Tensor, Tensor]]]:
    """The default MLP on the digits task (same seed on every rank) and this rank's minibatches."""
    from easgd.config.schema import TrainConfig
    from easgd.data.digits import load_digits_split
    from easgd.data.sampling import MinibatchSampler
    from easgd.parts.build import build_model

    split = load_digits_split(test_fraction=0.2, seed=0)
    model = build_model(TrainConfig().model, split, seed=0)
    sampler = MinibatchSampler(split, batch_size=64, worker_index=rank, num_workers=2)
    return model, [sampler.sample() for _ in range(steps)]


def localsgd_against_periodic_model_averager(
    rank: int, world: int, steps: int, period: int, learning_rate: float
) -> dict[str, Any]:
    """This rank's parameters after ``steps`` of torch's own local SGD (SGD + PeriodicModelAverager)
    and of easgd's localsgd over all-reduce, on the same model, seeds and minibatches."""
    from easgd.comm.allreduce import AllReduceSum
    from easgd.config.algorithm import AlgorithmConfig
    from easgd.engine.allreduce import (
        ReplicatedCenterLoop,
        control_slots,
        rank_round,
        rank_worker,
    )
    from easgd.flat import FlatModel

    dist.init_process_group("gloo", rank=rank, world_size=world)
    model, batches = digits_model_and_batches(rank, steps)
    ours = FlatModel(copy.deepcopy(model))
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate)
    reference = _periodic_model_averager_run(model, optimizer, batches, period)
    # easgd's: a round at the start of every step t with t % period == 0 (t = 0 averages equal
    # copies: exact for p = 2)
    config = AlgorithmConfig(name="localsgd", learning_rate=learning_rate)
    role = rank_worker(config, ours, comm_period=period)
    feed = iter(batches)
    loop = ReplicatedCenterLoop(
        role,
        role.params,
        AllReduceSum(numel=ours.num_params, control_slots=control_slots(world)),
        lambda point: ours.gradient(point, *next(feed)),
        rank=rank,
        num_workers=world,
        steps=steps,
        rule=rank_round(config, role.params, num_workers=world, measure=False),
    )
    outcome = loop.run()
    return {"torch": reference, "easgd": role.params.clone(), "rounds": outcome.rounds}


def api_diloco_with_adamw_against_torch(
    rank: int, world: int, steps: int, period: int
) -> dict[str, Any]:
    """api.AveragingOptimizer(diloco) around AdamW against every rank's DiLoCo written with torch's
    own optimizers in this process (AdamW inside, SGD(nesterov=True) on x~ with Delta in .grad)."""
    from easgd.api.averaging import AveragingOptimizer

    dist.init_process_group("gloo", rank=rank, world_size=world)
    data = [_batches(r, steps) for r in range(world)]
    models = [_net(0) for _ in range(world)]
    inners = [torch.optim.AdamW(m.parameters(), lr=0.01, weight_decay=0.1) for m in models]
    center = [nn.Parameter(p.detach().clone()) for p in models[0].parameters()]
    outer = torch.optim.SGD(center, lr=0.7, momentum=0.9, nesterov=True)
    for t in range(steps):
        for r in range(world):
            _train(models[r], inners[r], [data[r][t]])
        if (t + 1) % period == 0:
            for index, c in enumerate(center):
                mean = sum(list(m.parameters())[index].detach() for m in models) / world
                c.grad = c.detach() - mean
            outer.step()
            for m in models:  # x_i <- x~; AdamW's moments stay as they are
                for p, c in zip(m.parameters(), center, strict=True):
                    p.data.copy_(c.detach())
    model = _net(rank)  # a different start on rank 1: the wrapper broadcasts rank 0's
    inner = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    optimizer = AveragingOptimizer(model, inner, algorithm="diloco", comm_period=period)
    _train(model, optimizer, data[rank])
    return {
        "easgd": _flat(model.parameters()),
        "torch": _flat(models[rank].parameters()),
        "easgd_center": optimizer.center.clone(),
        "torch_center": _flat(center),
        "rounds": optimizer.rounds,
    }


def api_localsgd_with_momentum_against_periodic_model_averager(
    rank: int, world: int, steps: int, period: int
) -> dict[str, Any]:
    """api.AveragingOptimizer(localsgd) around SGD with Nesterov momentum against torch's
    SGD + PeriodicModelAverager on the same group (momentum buffers untouched by both)."""
    from easgd.api.averaging import AveragingOptimizer

    dist.init_process_group("gloo", rank=rank, world_size=world)
    batches = _batches(rank, steps)
    reference = _net(0)
    sgd = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    want = _periodic_model_averager_run(reference, sgd, batches, period)
    model = _net(0)
    inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    _train(
        model, AveragingOptimizer(model, inner, algorithm="localsgd", comm_period=period), batches
    )
    return {"easgd": _flat(model.parameters()), "torch": want}
