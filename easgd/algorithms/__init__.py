"""The update rules of the spec (docs/algorithms.md) as pure functions over tensors.

This package owns the math only: it never imports ``torch.distributed``. The simulator and the
distributed runtime both compose these functions, so there is one copy of every equation.
"""

from easgd.algorithms.admm import admm_round_robin_step
from easgd.algorithms.averaging import average_rate, polyak_rate, running_average
from easgd.algorithms.downpour import (
    downpour_local_step,
    downpour_pull,
    downpour_push,
    mdownpour_lookahead,
    mdownpour_server_step,
)
from easgd.algorithms.elastic import (
    apply_to_center,
    apply_to_worker,
    elastic_difference,
    elastic_exchange,
    is_exchange_step,
    synchronous_easgd_step,
)
from easgd.algorithms.hyperparams import (
    PAPER_BETA,
    PAPER_MOMENTUM,
    moving_rate_from_beta,
    resolve_moving_rate,
)
from easgd.algorithms.local import nesterov_lookahead, nesterov_step, sgd_step
from easgd.algorithms.replicated import replicated_center_exchange

__all__ = [
    "PAPER_BETA",
    "PAPER_MOMENTUM",
    "admm_round_robin_step",
    "apply_to_center",
    "apply_to_worker",
    "average_rate",
    "downpour_local_step",
    "downpour_pull",
    "downpour_push",
    "elastic_difference",
    "elastic_exchange",
    "is_exchange_step",
    "mdownpour_lookahead",
    "mdownpour_server_step",
    "moving_rate_from_beta",
    "nesterov_lookahead",
    "nesterov_step",
    "polyak_rate",
    "replicated_center_exchange",
    "resolve_moving_rate",
    "running_average",
    "sgd_step",
    "synchronous_easgd_step",
]
