"""The in-place fast path (roles + easgd.algorithms.inplace) equals the pure rules, for every algorithm.

The reference is computed here with the pure functions of :mod:`easgd.algorithms` only (never a
role), in float64, over many steps with exchanges: p = 3 workers in round robin, tau = 3, a noisy
quadratic. The fast path is the roles as the runtime drives them: gradients handed over as
per-parameter pieces, replies written into the payload's own buffer (the server's receive buffer),
the look-ahead written into a shared scratch buffer.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from easgd import algorithms as alg
from easgd.algorithms import inplace
from easgd.config.algorithm import AlgorithmConfig
from easgd.roles import (
    ElasticWorker,
    WorkerRole,
    make_server_role,
    make_worker_role,
    worker_step,
)

DIM, WORKERS, PERIOD, STEPS = 37, 3, 3, 50
SIZES = [10, 20, 7]  # the gradient's pieces, as per-parameter gradients would come
LR, MOMENTUM, MOVING_RATE = 0.05, 0.9, 0.2
TOL = 1e-12

CONFIGS = {
    "easgd": AlgorithmConfig("easgd", learning_rate=LR, moving_rate=MOVING_RATE),
    "eamsgd": AlgorithmConfig(
        "eamsgd", learning_rate=LR, momentum=MOMENTUM, moving_rate=MOVING_RATE
    ),
    "downpour": AlgorithmConfig("downpour", learning_rate=LR),
    "adownpour": AlgorithmConfig("adownpour", learning_rate=LR),
    "mvadownpour": AlgorithmConfig("mvadownpour", learning_rate=LR, average_rate=0.1),
    "mdownpour": AlgorithmConfig("mdownpour", learning_rate=LR, momentum=MOMENTUM),
    "sgd": AlgorithmConfig("sgd", learning_rate=LR),
    "msgd": AlgorithmConfig("msgd", learning_rate=LR, momentum=MOMENTUM),
    "asgd": AlgorithmConfig("asgd", learning_rate=LR),
    "mvasgd": AlgorithmConfig("mvasgd", learning_rate=LR, average_rate=0.1),
}


class Problem:
    """A noisy quadratic: g_i(x) at worker i's t-th gradient = h * x + noise[i][t]."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(11)
        self.curvature = torch.rand(DIM, dtype=torch.float64, generator=generator) + 0.2
        self.noise = torch.randn(WORKERS, STEPS + 1, DIM, dtype=torch.float64, generator=generator)
        self.start = torch.randn(DIM, dtype=torch.float64, generator=generator)
        self.calls = [0] * WORKERS

    def grad(self, worker: int, point: Tensor) -> Tensor:
        t, self.calls[worker] = self.calls[worker], self.calls[worker] + 1
        return self.curvature * point + self.noise[worker, t]


def reference(name: str) -> tuple[Tensor, list[Tensor]]:
    """(evaluated variable, workers' x_i) from the pure functions alone."""
    config, problem = CONFIGS[name], Problem()
    if not config.uses_server:
        x, v = problem.start.clone(), torch.zeros(DIM, dtype=torch.float64)
        z = x.clone()
        for t in range(STEPS):
            look = alg.nesterov_lookahead(x, v, momentum=config.momentum)
            x, v = alg.nesterov_step(
                x, v, problem.grad(0, look), learning_rate=LR, momentum=config.momentum
            )
            z = alg.running_average(
                z, x, rate=alg.average_rate(t + 1, constant_rate=config.average_rate)
            )
        return (z if config.averages else x), [x]
    xs = [problem.start.clone() for _ in range(WORKERS)]
    center = problem.start.clone()
    if name in ("easgd", "eamsgd"):
        vs = [torch.zeros(DIM, dtype=torch.float64) for _ in range(WORKERS)]
        for t in range(STEPS):
            for i in range(WORKERS):
                look = alg.nesterov_lookahead(xs[i], vs[i], momentum=config.momentum)
                if alg.is_exchange_step(t, comm_period=PERIOD):
                    diff = alg.elastic_difference(xs[i], center, moving_rate=MOVING_RATE)
                    xs[i] = alg.apply_to_worker(xs[i], diff)
                    center = alg.apply_to_center(center, diff)
                xs[i], vs[i] = alg.nesterov_step(
                    xs[i], vs[i], problem.grad(i, look), learning_rate=LR, momentum=config.momentum
                )
        return center, xs
    if name == "mdownpour":
        velocity = torch.zeros(DIM, dtype=torch.float64)
        pending: list[Tensor | None] = [None] * WORKERS

        def push(grad: Tensor | None) -> None:
            nonlocal center, velocity
            if grad is not None:
                center, velocity = alg.mdownpour_server_step(
                    center, velocity, grad, learning_rate=LR, momentum=MOMENTUM
                )

        for _ in range(STEPS):
            for i in range(WORKERS):
                push(pending[i])
                xs[i] = alg.mdownpour_lookahead(center, velocity, momentum=MOMENTUM)
                pending[i] = problem.grad(i, xs[i])
        for i in range(WORKERS):
            push(pending[i])
        return center, xs
    accumulated = [torch.zeros(DIM, dtype=torch.float64) for _ in range(WORKERS)]
    average, updates = center.clone(), 0
    for t in range(STEPS):
        for i in range(WORKERS):
            if alg.is_exchange_step(t, comm_period=PERIOD):
                center = alg.downpour_push(center, accumulated[i])
                updates += 1
                rate = alg.average_rate(updates, constant_rate=config.average_rate)
                average = alg.running_average(average, center, rate=rate)
                xs[i], accumulated[i] = alg.downpour_pull(center)
            xs[i], accumulated[i] = alg.downpour_local_step(
                xs[i], accumulated[i], problem.grad(i, xs[i]), learning_rate=LR
            )
    return (average if config.averages else center), xs


def fast(name: str, *, params_in_scratch: bool = False) -> tuple[Tensor, list[Tensor]]:
    """The same run through the in-place roles, as the runtime drives them.

    ``params_in_scratch`` (EASGD): each worker keeps x_i in its own scratch buffer, as the
    all-reduce topology's ranks keep it in their model.
    """
    config, problem = CONFIGS[name], Problem()
    workers = WORKERS if config.uses_server else 1
    period = 1 if name == "mdownpour" else PERIOD
    scratch = torch.empty(DIM, dtype=torch.float64)  # one look-ahead buffer, like FlatModel's
    roles: list[WorkerRole] = [
        make_worker_role(config, problem.start, comm_period=period, scratch=scratch)
        for _ in range(workers)
    ]
    if params_in_scratch:
        roles = [
            ElasticWorker(
                problem.start,
                comm_period=period,
                learning_rate=config.learning_rate,
                momentum=config.momentum,
                scratch=torch.empty(DIM, dtype=torch.float64),
                params_in_scratch=True,
            )
            for _ in range(workers)
        ]
    server = make_server_role(config, problem.start, num_workers=workers) if workers > 1 else None
    receive = torch.empty(DIM, dtype=torch.float64)  # the server's receive buffer

    def exchange(worker: int, payload: Tensor | None) -> Tensor:
        assert server is not None
        if payload is None:
            return server.handle(worker, None, out=receive)
        receive.copy_(payload)  # what the transport does; the reply overwrites it in place
        return server.handle(worker, receive, out=receive)

    def gradient(worker: int, point: Tensor) -> tuple[float, list[Tensor]]:
        return 0.0, list(problem.grad(worker, point).clone().split(SIZES))

    for _ in range(STEPS):
        for i, role in enumerate(roles):
            worker_step(
                role,
                lambda point, i=i: gradient(i, point),
                lambda payload, i=i: exchange(i, payload),
            )
    if server is None:
        return roles[0].evaluated(), [roles[0].params]
    for i, role in enumerate(roles):
        final = role.final_outgoing()
        if final is not None:
            exchange(i, final)
    return server.evaluated(), [role.params for role in roles]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fast_path_equals_the_pure_rules(name: str) -> None:
    expected, expected_workers = reference(name)
    got, got_workers = fast(name)
    scale = max(1.0, float(expected.abs().max()))
    assert float((got - expected).abs().max()) <= TOL * scale, name
    for x_fast, x_ref in zip(got_workers, expected_workers, strict=True):
        assert float((x_fast - x_ref).abs().max()) <= TOL * scale, name
    # the run moved far from the start: an update left out would show
    assert float((expected - Problem().start).abs().max()) > 0.1


def test_easgd_worker_keeping_x_in_scratch_is_the_plain_worker_bit_for_bit() -> None:
    # x_i kept in the scratch buffer, its elastic move deferred to the start of the local step
    # (after the gradient at the pre-move point): the same values as the plain role, exactly
    want_center, want_workers = fast("easgd")
    got_center, got_workers = fast("easgd", params_in_scratch=True)
    assert torch.equal(got_center, want_center)
    assert all(torch.equal(a, b) for a, b in zip(got_workers, want_workers, strict=True))
    expected, _ = reference("easgd")
    assert float((got_center - expected).abs().max()) <= TOL * max(1.0, float(expected.abs().max()))


def test_params_in_scratch_is_refused_with_momentum_and_guards_its_deferred_move() -> None:
    start = torch.zeros(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="momentum 0"):
        ElasticWorker(
            start, comm_period=1, learning_rate=0.1, momentum=0.9,
            scratch=torch.empty(4, dtype=torch.float64), params_in_scratch=True,
        )  # fmt: skip
    scratch = torch.empty(4, dtype=torch.float64)
    role = ElasticWorker(
        start + 1, comm_period=1, learning_rate=0.1, momentum=0.0,
        scratch=scratch, params_in_scratch=True,
    )  # fmt: skip
    assert role.params is scratch and torch.equal(scratch, start + 1)
    role.incoming(role.outgoing().mul(0.5))  # e = x / 2, held until the step
    assert torch.equal(role.gradient_point(), start + 1)  # the gradient point is before the move
    with pytest.raises(RuntimeError, match="misses the move"):
        role.state_dict()
    role.local_step(torch.ones(4, dtype=torch.float64))  # x <- (1 - 0.5) + (-0.1 * 1)
    assert torch.equal(role.params, torch.full((4,), 0.5 - 0.1, dtype=torch.float64))
    assert torch.equal(role.velocity, torch.zeros(4, dtype=torch.float64))  # never written


@pytest.mark.parametrize("with_move", [False, True])
def test_sgd_step_chunk_by_chunk_is_the_pure_move_and_step_bit_for_bit(with_move: bool) -> None:
    # float32 as in the runtime; pieces that straddle chunk boundaries; the pure reference rounds
    # eta * g on its own (x - eta * g), which a fused multiply-add would not
    size = 2 * inplace.CHUNK + 5
    generator = torch.Generator().manual_seed(8)
    x, g, e = torch.randn(3, size, generator=generator)
    want = alg.sgd_step(alg.apply_to_worker(x, e) if with_move else x, g, learning_rate=0.037)
    got = x.clone()
    inplace.sgd_step_(
        got,
        list(g.split([inplace.CHUNK + 3, inplace.CHUNK + 2])),
        learning_rate=0.037,
        buffer=torch.empty(inplace.CHUNK),
        elastic_diff=e if with_move else None,
    )
    assert torch.equal(got, want)
    assert not torch.equal(got, x.add(g, alpha=-0.037) - (e if with_move else 0))  # not fused


def test_elastic_update_is_bit_for_bit_the_pure_exchange() -> None:
    generator = torch.Generator().manual_seed(5)
    worker, center = torch.randn(
        2, 3 * inplace.CHUNK + 17, dtype=torch.float64, generator=generator
    )
    new_worker, new_center, diff = alg.elastic_exchange(worker, center, moving_rate=0.3)
    out = worker.clone()  # the receive buffer, overwritten by the reply
    center_inplace = center.clone()
    inplace.elastic_update_(center_inplace, out, out, moving_rate=0.3)
    assert torch.equal(out, diff) and torch.equal(center_inplace, new_center)
    moved = worker.clone()
    inplace.apply_to_worker_(moved, out)
    assert torch.equal(moved, new_worker)


def test_guarded_elastic_update_reports_the_norm_of_the_difference() -> None:
    generator = torch.Generator().manual_seed(6)
    worker, center = torch.randn(2, 2 * inplace.CHUNK + 5, dtype=torch.float64, generator=generator)
    out = torch.empty_like(worker)
    norm = inplace.elastic_difference_(out, worker, center, moving_rate=0.25)
    assert norm == pytest.approx(0.25 * float((worker - center).norm()), rel=1e-12)
    assert torch.equal(out, alg.elastic_difference(worker, center, moving_rate=0.25))


def test_nesterov_step_on_pieces_equals_the_flat_step() -> None:
    generator = torch.Generator().manual_seed(7)
    x, v, g = torch.randn(3, 37, dtype=torch.float64, generator=generator)
    flat_x, flat_v = x.clone(), v.clone()
    inplace.nesterov_step_(flat_x, flat_v, g, learning_rate=0.1, momentum=0.9)
    piece_x, piece_v = x.clone(), v.clone()
    inplace.nesterov_step_(piece_x, piece_v, list(g.split(SIZES)), learning_rate=0.1, momentum=0.9)
    assert torch.equal(flat_x, piece_x) and torch.equal(flat_v, piece_v)
    expected_x, expected_v = alg.nesterov_step(x, v, g, learning_rate=0.1, momentum=0.9)
    assert torch.allclose(flat_v, expected_v, rtol=0, atol=1e-15)
    assert torch.allclose(flat_x, expected_x, rtol=0, atol=1e-15)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_nesterov_step_chunk_by_chunk_is_the_foreach_form_bit_for_bit(momentum: float) -> None:
    # float32 as in the runtime, over more than two chunks with a ragged tail, in two pieces that
    # do not start on a chunk boundary; the reference is the unchunked whole-tensor form
    size = 2 * inplace.CHUNK + 5
    generator = torch.Generator().manual_seed(5)
    x, v, g = torch.randn(3, size, generator=generator)
    got_x, got_v = x.clone(), v.clone()
    grad = list(g.split([inplace.CHUNK + 3, inplace.CHUNK + 2]))
    inplace.nesterov_step_(got_x, got_v, grad, learning_rate=0.05, momentum=momentum)
    want_v = v.clone()
    torch._foreach_mul_([want_v], momentum)
    torch._foreach_add_([want_v], [g], alpha=-0.05)
    assert torch.equal(got_v, want_v)
    assert torch.equal(got_x, x + want_v)
    if momentum == 0:  # and then it is the pure rule exactly, not only within rounding
        pure_x, pure_v = alg.nesterov_step(x, v, g, learning_rate=0.05, momentum=0.0)
        assert torch.equal(got_v, pure_v) and torch.equal(got_x, pure_x)


def test_replicated_center_exchange_in_place_is_the_pure_exchange_bit_for_bit() -> None:
    size = 2 * inplace.CHUNK + 5
    generator = torch.Generator().manual_seed(6)
    worker, center, others = torch.randn(3, size, generator=generator)
    want_diff, want_center = alg.replicated_center_exchange(
        worker, center, moving_rate=0.3, reduce_sum=lambda diff: diff + others
    )
    sent: list[Tensor] = []

    def reduce_sum(diff: Tensor) -> Tensor:
        sent.append(diff.clone())
        return diff + others

    out, got_center, got_worker = torch.empty(size), center.clone(), worker.clone()
    got = inplace.replicated_center_exchange_(
        out, got_worker, got_center, moving_rate=0.3, reduce_sum=reduce_sum
    )
    assert got is out and torch.equal(out, want_diff) and torch.equal(sent[0], want_diff)
    assert torch.equal(got_center, want_center)
    assert torch.equal(got_worker, worker)  # the worker applies e itself, afterwards
