"""Synchronous EASGD in its replicated-center form: no server, every worker keeps a copy of x~.

Every tau steps each worker i computes e_i = alpha (x_i - x~) against its own copy of the center,
moves x_i <- x_i - e_i, and adds the sum of all workers' e_i to its copy:

    x~ <- x~ + sum_j e_j  =  x~ + alpha * sum_j (x_j_old - x~)

which is the synchronous center update of docs/algorithms.md. Every copy starts equal
and adds the same sum, so the copies stay identical. The sum itself is transport (an all-reduce),
so it is passed in as ``reduce_sum``; nothing here imports ``torch.distributed``.

Conserved: with learning rate 0, sum_i x_i + x~ (the center counted once) is unchanged by an
exchange, since the workers lose sum_j e_j and the center gains it; sum_i x_i + p x~ (every copy
counted) is not, it grows by (p - 1) sum_j e_j.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from easgd.algorithms.elastic import apply_to_center, elastic_difference


def replicated_center_exchange(
    worker: Tensor,
    center: Tensor,
    *,
    moving_rate: float,
    reduce_sum: Callable[[Tensor], Tensor],
) -> tuple[Tensor, Tensor]:
    """One worker's side of a synchronous exchange against its own copy of the center.

    Returns ``(elastic_diff, new_center)``: the worker applies ``x_i - elastic_diff`` (as in the
    asynchronous exchange) and keeps ``new_center = center + reduce_sum(elastic_diff)``, where
    ``reduce_sum`` returns the sum of every worker's elastic difference (and must not modify its
    argument).
    """
    diff = elastic_difference(worker, center, moving_rate=moving_rate)
    return diff, apply_to_center(center, reduce_sum(diff))
