"""Targets of the multi-process local SGD / DiLoCo tests (run in spawned gloo ranks, so they live
at module level here, importable by the child processes)."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


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
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

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
    # torch's: average after every period-th step (after steps period - 1, 2 period - 1, ...)
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate)
    averager = PeriodicModelAverager(period=period, warmup_steps=period - 1)
    for inputs, targets in batches:
        optimizer.zero_grad()
        F.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
        averager.average_parameters(model.parameters())
    reference = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
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
