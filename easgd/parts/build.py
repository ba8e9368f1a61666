"""Builds the dataset, the model and its flat view from a :class:`TrainConfig`, the same on every rank."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from easgd.comm.compression import Compression
from easgd.comm.groups import SERVER_RANK
from easgd.comm.transport import Delay, PairTransport, WorkerTransport, pair_transport
from easgd.config.schema import DataConfig, ModelConfig, TrainConfig
from easgd.data.split import Split


def import_object(path: str) -> Any:
    """``package.module.name`` -> the object (for ``_target_``-style custom datasets and models)."""
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ValueError(f"{path!r} is not an import path of the form package.module.name")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import {path!r}: {err}") from None


def build_split(data: DataConfig) -> Split:
    """Load the configured dataset as in-memory train/test tensors (``data.train_subset`` applied)."""
    split = _load_split(data)
    if data.train_subset is not None:
        split = split.subset(data.train_subset)
    return split


def _load_split(data: DataConfig) -> Split:
    if data.name == "digits":
        from easgd.data.digits import load_digits_split

        return load_digits_split(test_fraction=data.test_fraction, seed=data.split_seed)
    if data.name == "mnist1d":
        from easgd.data.mnist1d import load_mnist1d

        return load_mnist1d()
    if data.name == "synthetic":
        from easgd.data.synthetic import make_teacher_student

        return make_teacher_student(
            num_samples=data.num_samples,
            num_features=data.num_features,
            num_classes=data.num_classes,
            teacher_hidden=data.teacher_hidden,
            test_fraction=data.test_fraction,
            seed=data.split_seed,
        )
    if data.name == "mnist":
        from easgd.data.mnist import load_mnist

        assert data.root is not None
        return load_mnist(data.root)
    if data.name == "cifar10":
        from easgd.data.cifar10 import load_cifar10

        assert data.root is not None
        return load_cifar10(data.root)
    from easgd.data.custom import load_custom

    assert data.target is not None
    return load_custom(import_object(data.target), data.kwargs)


def build_model(model: ModelConfig, split: Split, *, seed: int) -> nn.Module:
    """The configured network, initialised from ``seed`` (identical on every rank)."""
    torch.manual_seed(seed)
    shape, classes = split.input_shape, split.num_classes
    if model.name == "mlp":
        from easgd.models.mlp import MLP

        return MLP(shape, classes, tuple(model.hidden))
    if model.name == "lenet":
        from easgd.models.lenet import LeNet

        return LeNet(shape, classes)
    if model.name == "cnn1d":
        from easgd.models.cnn1d import ConvNet1D

        return ConvNet1D(shape, classes, channels=model.channels)
    if model.name == "cifar7":
        from easgd.models.cifar7 import Cifar7

        return Cifar7(shape, classes)
    assert model.target is not None
    factory: Callable[..., nn.Module] = import_object(model.target)
    module = factory(input_shape=shape, num_classes=classes, **model.kwargs)
    if not isinstance(module, nn.Module):
        raise ValueError(
            f"model.target={model.target!r} returned {type(module).__name__}, not an nn.Module"
        )
    return module


def device_for(cfg: TrainConfig, local_rank: int) -> torch.device:
    """The worker's device: CUDA (one GPU per local worker, round robin) or CPU."""
    want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if want_cuda:
        if not torch.cuda.is_available():
            raise ValueError("device=cuda but CUDA is not available here; use device=cpu or auto")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def transport_for(
    cfg: TrainConfig,
    peer: int,
    group: Any,
    numel: int,
    own_rank: int,
    *,
    pin_memory: bool = False,
    worker: bool = False,
    direct: bool = False,
) -> PairTransport:
    """The pair transport to ``peer`` (compressed with ``comm.compression``; ``worker``: this is
    the worker's end, which encodes and decodes)."""
    pair: dict[str, Any] = dict(
        pin_memory=pin_memory,
        peer=peer,
        group=group,
        numel=numel,
        delay=Delay(cfg.comm.latency_ms, cfg.comm.jitter_ms),
        seed=cfg.seed * 7919 + own_rank * 31 + peer,
        direct=direct,
    )
    comm, compression = cfg.comm, None
    if comm.compression != "none":
        elastic = cfg.algorithm.spec.elastic
        compression = Compression(comm.compression, comm.error_feedback, elastic, numel)
    return pair_transport(compression, worker=worker, **pair)


def worker_transport(
    cfg: TrainConfig,
    groups: dict[int, Any],
    numel: int,
    own_rank: int,
    *,
    pin_memory: bool = False,
    direct: bool = False,
) -> WorkerTransport:
    """A worker's link to the center: one server (rank 0, ``groups[own_rank]``), or with
    ``server.shards`` = k > 1, the k shard ranks 0..k-1 (``groups[shard]``), each with its slice."""
    shards = cfg.server.shards
    if shards == 1:
        group = groups[own_rank]
        return transport_for(
            cfg,
            SERVER_RANK,
            group,
            numel,
            own_rank,
            pin_memory=pin_memory,
            worker=True,
            direct=direct,
        )
    from easgd.comm.sharded import ShardedTransport
    from easgd.roles.sharded import shard_bounds

    bounds = shard_bounds(numel, shards)
    links = [
        transport_for(
            cfg, shard, groups[shard], hi - lo, own_rank, pin_memory=pin_memory, worker=True
        )
        for shard, (lo, hi) in enumerate(bounds)
    ]
    return ShardedTransport(links, bounds)
