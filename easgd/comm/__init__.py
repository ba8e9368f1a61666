"""Transport: process groups and point-to-point messages. Moves tensors; knows no learning rate."""

from easgd.comm.groups import SERVER_RANK, DistEnv, LaunchError, init_pair_groups
from easgd.comm.message import Header, Op, ServerRejected
from easgd.comm.transport import Delay, PairTransport

__all__ = [
    "SERVER_RANK",
    "Delay",
    "DistEnv",
    "Header",
    "LaunchError",
    "Op",
    "PairTransport",
    "ServerRejected",
    "init_pair_groups",
]
