"""Worker and server roles: each algorithm's state and rules, composed from :mod:`easgd.algorithms`.

Roles know what to send and how to apply a reply; they never move bytes. The simulator and the
distributed runtime are two drivers of the same roles.
"""

from easgd.roles.factory import make_server_role, make_worker_role
from easgd.roles.server import (
    DownpourServer,
    ElasticServer,
    MDownpourServer,
    ServerRole,
    UpdateRefused,
)
from easgd.roles.worker import (
    DownpourWorker,
    ElasticWorker,
    ExchangeFn,
    GradientFn,
    MDownpourWorker,
    SequentialWorker,
    WorkerRole,
    apply_gradient,
    exchange_if_due,
    gradient_step,
    worker_step,
)

__all__ = [
    "DownpourServer",
    "DownpourWorker",
    "ElasticServer",
    "ElasticWorker",
    "ExchangeFn",
    "GradientFn",
    "MDownpourServer",
    "MDownpourWorker",
    "SequentialWorker",
    "ServerRole",
    "UpdateRefused",
    "WorkerRole",
    "apply_gradient",
    "exchange_if_due",
    "gradient_step",
    "make_server_role",
    "make_worker_role",
    "worker_step",
]
