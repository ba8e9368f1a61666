"""Elastic averaging for your own training loop: wrap your optimizer on workers, serve on rank 0.

Launch with torchrun (rank 0 serves the center, ranks 1..p train)::

    torchrun --standalone --nproc_per_node=3 my_train.py

and in ``my_train.py`` (a complete, runnable version is ``examples/mnist1d_cnn.py``)::

    session = api.join()
    model = Net()                                   # the same architecture on every rank
    if session.is_server:
        api.serve(model, session, evaluate=test, run_dir="runs/mine")   # model <- the center
    else:
        optimizer = api.ElasticOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.05),
                                         session, comm_period=10)
        for inputs, targets in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(inputs), targets).backward()
            optimizer.step()                        # Algorithm 1: gradient at x, exchange, step
        optimizer.close()
    session.close()

Both sides run the runtime's own machinery: :class:`~easgd.engine.worker.WorkerLoop` on the
workers and :class:`~easgd.engine.server.ParameterServer` on rank 0. See docs/own_loop.md.
Local SGD and DiLoCo need no server: :class:`~easgd.api.averaging.AveragingOptimizer`.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from easgd.api.averaging import AveragingOptimizer
from easgd.api.keeper import keep
from easgd.api.optimizer import ElasticOptimizer
from easgd.api.serve import serve
from easgd.api.session import Session, join


class _NoLocalStep(torch.optim.Optimizer):
    """An optimizer whose step changes nothing (the user's own optimizer already stepped)."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        super().__init__(params, {})

    def step(self, closure: object = None) -> None:  # type: ignore[override]
        return None


class ElasticAverager:
    """Deprecated: call :meth:`step` after every ``optimizer.step()``; use ElasticOptimizer.

    The exchange then follows the local step, so the gradient of a step is not taken at the point
    the exchange sends (Algorithm 1 takes it there); :class:`ElasticOptimizer` runs the spec's
    order. Kept so that scripts written for it run unchanged, on the same machinery.
    """

    def __init__(self, model: nn.Module, session: Session, *, comm_period: int = 10) -> None:
        warnings.warn(
            "api.ElasticAverager is deprecated: wrap the optimizer in api.ElasticOptimizer, "
            "which runs Algorithm 1's order",
            DeprecationWarning,
            stacklevel=2,
        )
        params = [p for p in model.parameters() if p.requires_grad]
        self._optimizer = ElasticOptimizer(
            model, _NoLocalStep(params), session, comm_period=comm_period
        )

    @property
    def should_stop(self) -> bool:
        """Set when the server asked the workers to stop."""
        return self._optimizer.should_stop

    def step(self) -> None:
        """Count one optimizer step; exchange on every ``comm_period``-th call."""
        self._optimizer.step()

    def close(self) -> None:
        """Tell the server this worker is done."""
        self._optimizer.close()


__all__ = [
    "AveragingOptimizer",
    "ElasticAverager",
    "ElasticOptimizer",
    "Session",
    "join",
    "keep",
    "serve",
]
