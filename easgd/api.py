"""Elastic averaging for your own training loop: one call per step on workers, one call on the server.

Launch with torchrun (rank 0 serves the center, ranks 1..p train)::

    torchrun --standalone --nproc_per_node=3 my_train.py

and in ``my_train.py``::

    import torch
    from easgd import api

    session = api.join()                      # process groups: one per (server, worker) pair
    model = torch.nn.Linear(10, 2)            # the same architecture on every rank
    if session.is_server:
        api.serve(model, session, moving_rate=0.9 / session.num_workers)  # model <- center
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        averager = api.ElasticAverager(model, session, comm_period=10)
        for step in range(200):
            loss = model(torch.randn(32, 10)).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            averager.step()                   # the elastic exchange, every comm_period calls
        averager.close()
    session.close()

Semantics: the exchange runs after ``optimizer.step()``, so the next gradient is taken at the moved
point (Algorithm 1 takes the step's gradient before the move; ``python -m easgd.train`` runs the
exact algorithms). With a momentum optimizer the elastic move acts on the parameters only and its
buffers are left alone, as EAMSGD requires; note that torch's Nesterov SGD keeps the shifted point
x + delta * v in the parameters, so the difference sent is alpha (x + delta v - center).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from easgd.comm.groups import (
    SERVER_RANK,
    DistEnv,
    LaunchError,
    choose_backend,
    init_pair_groups,
    shutdown,
)
from easgd.comm.message import Header, Op
from easgd.comm.transport import PairTransport
from easgd.roles import ElasticServer
from easgd.runtime.runlog import RunLog
from easgd.runtime.server import ParameterServer, StopRule
from easgd.runtime.worker import handshake


@dataclass
class Session:
    """This process's place in the run and its pair process groups."""

    env: DistEnv
    groups: dict[int, dist.ProcessGroup]

    @property
    def is_server(self) -> bool:
        """True on rank 0, which holds the center."""
        return self.env.rank == SERVER_RANK

    @property
    def num_workers(self) -> int:
        """p = world size - 1."""
        return self.env.world_size - 1

    def close(self) -> None:
        """Leave the process groups."""
        shutdown()


def join(*, backend: str = "auto", timeout_s: float = 120.0) -> Session:
    """Join the run started by torchrun (rank 0 = server, at least one worker)."""
    env = DistEnv.from_environ()
    if env.world_size < 2:
        raise LaunchError(
            "easgd.api needs a server and at least one worker: torchrun --nproc_per_node>=2"
        )
    pairs = init_pair_groups(env, backend=choose_backend(backend), timeout_s=timeout_s)
    return Session(env, pairs.groups)


def _params(model: nn.Module) -> list[Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


class ElasticAverager:
    """Worker side: call :meth:`step` after every ``optimizer.step()``."""

    def __init__(self, model: nn.Module, session: Session, *, comm_period: int = 10) -> None:
        if session.is_server:
            raise LaunchError("ElasticAverager runs on workers (rank >= 1); rank 0 calls api.serve")
        if comm_period < 1:
            raise ValueError(f"comm_period must be an integer >= 1, got {comm_period!r}")
        self.params = _params(model)
        numel = sum(p.numel() for p in self.params)
        self.transport = PairTransport(
            peer=SERVER_RANK,
            group=session.groups[session.env.rank],
            numel=numel,
        )
        self.comm_period = comm_period
        self.calls = 0
        self.should_stop = False
        """Set when the server asked the workers to stop."""
        center = handshake(self.transport)
        with torch.no_grad():
            vector_to_parameters(center.to(self.params[0].device), self.params)

    def step(self) -> bool:
        """Count one optimizer step; do the elastic exchange on every ``comm_period``-th call.

        Returns True when an exchange happened.
        """
        due = self.calls % self.comm_period == 0
        self.calls += 1
        if not due:
            return False
        with torch.no_grad():
            point = parameters_to_vector(self.params)
            self.transport.send(Header(Op.EXCHANGE, step=self.calls), point)
            header, diff = self.transport.recv()
            assert diff is not None
            self.should_stop = self.should_stop or header.stop
            vector_to_parameters(point - diff.to(point.device), self.params)
        return True

    def close(self) -> None:
        """Tell the server this worker is done."""
        self.transport.send(Header(Op.DONE, step=self.calls))
        self.transport.recv()


def serve(
    model: nn.Module,
    session: Session,
    *,
    moving_rate: float,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    run_dir: str | None = None,
    eval_interval_s: float = 5.0,
    max_wall_s: float | None = None,
) -> nn.Module:
    """Server side: hold the center (initialised from ``model``) until every worker is done.

    ``evaluate(model)`` (optional) returns ``test_loss`` and ``test_error`` of the center loaded
    into ``model``; ``run_dir`` (optional) receives metrics.csv and TensorBoard events. Returns
    ``model`` holding the final center.
    """
    if not session.is_server:
        raise LaunchError("api.serve runs on rank 0; workers use ElasticAverager")
    params = _params(model)
    role = ElasticServer(parameters_to_vector(params).detach().cpu(), moving_rate=moving_rate)
    transports = {
        rank: PairTransport(peer=rank, group=group, numel=role.center.numel())
        for rank, group in session.groups.items()
    }

    def evaluate_center(center: Tensor) -> dict[str, float]:
        if evaluate is None:
            return {"test_loss": math.nan, "test_error": math.nan}
        with torch.no_grad():
            vector_to_parameters(center.to(params[0].device), params)
        return evaluate(model)

    with tempfile.TemporaryDirectory() as scratch:
        runlog = RunLog(run_dir or scratch, tensorboard=run_dir is not None)
        try:
            ParameterServer(
                role,
                transports,
                evaluate=evaluate_center,
                runlog=runlog,
                stop_rule=StopRule(max_wall_s=max_wall_s),
                eval_interval_s=eval_interval_s,
                total_steps=0,
                progress=False,
            ).run()
        finally:
            runlog.close()
    with torch.no_grad():
        vector_to_parameters(role.center.to(params[0].device), params)
    return model
