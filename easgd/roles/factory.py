"""Which role runs a rule: the one place that maps an :class:`AlgorithmConfig` to its worker and
server roles (every role module below it, none importing this one)."""

from __future__ import annotations

from torch import Tensor

from easgd.algorithms.schedules import LearningRateSchedule
from easgd.config.algorithm import AlgorithmConfig
from easgd.roles.averaging import AveragingServer, AveragingWorker
from easgd.roles.server import DownpourServer, ElasticServer, MDownpourServer, ServerRole
from easgd.roles.worker import (
    DownpourWorker,
    ElasticWorker,
    MDownpourWorker,
    SequentialWorker,
    WorkerRole,
)


def make_server_role(config: AlgorithmConfig, center: Tensor, *, num_workers: int) -> ServerRole:
    """The server role of ``config.name`` holding ``center``."""
    spec = config.spec
    if spec.elastic:
        return ElasticServer(center, moving_rate=config.resolved_moving_rate(num_workers))
    if spec.family == "averaging":
        return AveragingServer(config, center, num_workers=num_workers)
    if spec.server_momentum:
        return MDownpourServer(center, learning_rate=config.learning_rate, momentum=config.momentum)
    if spec.family == "downpour":
        return DownpourServer(center, average=config.averages, average_rate=config.average_rate)
    raise ValueError(f"{config.name!r} runs without a server (sequential baseline)")


def make_worker_role(
    config: AlgorithmConfig,
    params: Tensor,
    *,
    comm_period: int,
    scratch: Tensor | None = None,
    schedule: LearningRateSchedule | None = None,
    max_grad_norm: float | None = None,
) -> WorkerRole:
    """The worker role of ``config.name`` starting from ``params``.

    ``scratch`` (optional): a buffer shaped like ``params`` where momentum workers write their
    look-ahead point, typically :attr:`easgd.flat.FlatModel.flat_params`. ``schedule`` and
    ``max_grad_norm``: the local step's extras (:meth:`WorkerRole.set_local_step`).
    """
    role = _new_worker_role(config, params, comm_period=comm_period, scratch=scratch)
    return role.set_local_step(schedule=schedule, max_grad_norm=max_grad_norm)


def _new_worker_role(
    config: AlgorithmConfig, params: Tensor, *, comm_period: int, scratch: Tensor | None
) -> WorkerRole:
    spec = config.spec
    spec.check_comm_period(comm_period)
    if spec.elastic or spec.family == "averaging":
        return (ElasticWorker if spec.elastic else AveragingWorker)(
            params,
            comm_period=comm_period,
            learning_rate=config.learning_rate,
            momentum=config.momentum,
            scratch=scratch,
        )
    if spec.server_momentum:  # the server steps from the gradients its workers push
        return MDownpourWorker(params)
    if spec.family == "downpour":
        return DownpourWorker(params, comm_period=comm_period, learning_rate=config.learning_rate)
    return SequentialWorker(
        params,
        learning_rate=config.learning_rate,
        momentum=config.momentum,
        average=config.averages,
        average_rate=config.average_rate,
        scratch=scratch,
    )
