"""The update rules against the equations of docs/algorithms.md, on hand-computed cases.

Expected values are written out from the spec's equations in plain arithmetic, never by calling
the function under test.
"""

from __future__ import annotations

import pytest
import torch

from easgd import algorithms as alg
from easgd.config.algorithm import AlgorithmConfig
from easgd.roles import (
    DownpourServer,
    DownpourWorker,
    ElasticServer,
    ElasticWorker,
    MDownpourServer,
    MDownpourWorker,
    SequentialWorker,
    make_server_role,
    make_worker_role,
    worker_step,
)
from tests.conftest import f64


def quadratic_grad(point: torch.Tensor) -> tuple[float, torch.Tensor]:
    """F(x) = x^2 / 2: gradient x."""
    return float(0.5 * point.pow(2).sum()), point.clone()


def test_elastic_exchange_hand_computed() -> None:
    # x = (1, -2), center = (0.5, 0), alpha = 0.25: e = (0.125, -0.5)
    worker, center, diff = alg.elastic_exchange(f64(1, -2), f64(0.5, 0), moving_rate=0.25)
    assert torch.equal(diff, f64(0.125, -0.5))
    assert torch.equal(worker, f64(0.875, -1.5))
    assert torch.equal(center, f64(0.625, -0.5))


def test_easgd_step_takes_gradient_before_the_elastic_move() -> None:
    # Algorithm 1 at t = 0 with eta = 0.1, alpha = 0.25, F = x^2/2:
    #   x_i <- x_i - alpha (x_i - center) - eta * x_i(old)
    worker = ElasticWorker(f64(1, -2), comm_period=1, learning_rate=0.1, momentum=0.0)
    server = ElasticServer(f64(0.5, 0), moving_rate=0.25)
    points: list[torch.Tensor] = []

    def grad(point: torch.Tensor) -> tuple[float, torch.Tensor]:
        points.append(point.clone())
        return quadratic_grad(point)

    worker_step(worker, grad, lambda payload: server.handle(0, payload))
    assert torch.equal(points[0], f64(1, -2))  # the value before the move, not (0.875, -1.5)
    assert torch.allclose(worker.params, f64(1 - 0.125 - 0.1, -2 + 0.5 + 0.2), atol=1e-15)
    assert torch.equal(server.center, f64(0.625, -0.5))


def test_eamsgd_two_steps_hand_computed() -> None:
    # Algorithm 2, tau = 2, eta = 0.1, delta = 0.5, alpha = 0.5, F = x^2/2, scalar x0 = 1, center 0.
    # t=0: exchange e = 0.5 * (1 - 0) = 0.5, x = 0.5, center = 0.5;
    #      v = 0.5*0 - 0.1*g(1 + 0) = -0.1; x = 0.5 - 0.1 = 0.4
    # t=1: no exchange; look-ahead 0.4 + 0.5*(-0.1) = 0.35; v = -0.05 - 0.035 = -0.085; x = 0.315
    worker = ElasticWorker(f64(1), comm_period=2, learning_rate=0.1, momentum=0.5)
    server = ElasticServer(f64(0), moving_rate=0.5)
    exchange = lambda payload: server.handle(0, payload)  # noqa: E731
    worker_step(worker, quadratic_grad, exchange)
    assert worker.params.item() == pytest.approx(0.4, abs=1e-15)
    assert worker.velocity.item() == pytest.approx(-0.1, abs=1e-15)
    assert server.center.item() == 0.5
    worker_step(worker, quadratic_grad, exchange)
    assert worker.velocity.item() == pytest.approx(-0.085, abs=1e-15)
    assert worker.params.item() == pytest.approx(0.315, abs=1e-15)
    assert server.center.item() == 0.5  # no exchange at t = 1


def test_eamsgd_elastic_move_acts_on_params_not_velocity() -> None:
    worker = ElasticWorker(f64(2.0), comm_period=1, learning_rate=0.0, momentum=0.9)
    worker.velocity = f64(0.3)
    server = ElasticServer(f64(0.0), moving_rate=0.5)
    worker_step(worker, quadratic_grad, lambda payload: server.handle(0, payload))
    # eta = 0: v = 0.9 * 0.3 = 0.27 (the elastic move leaves v alone); x = 2 - 1 + 0.27
    assert worker.velocity.item() == pytest.approx(0.27, abs=1e-15)
    assert worker.params.item() == pytest.approx(1.27, abs=1e-15)


def test_eamsgd_with_zero_momentum_equals_easgd_and_algorithm_1() -> None:
    generator = torch.Generator().manual_seed(3)
    start = torch.randn(5, dtype=torch.float64, generator=generator)
    noise = torch.randn(20, 5, dtype=torch.float64, generator=generator)
    eta, alpha, tau = 0.05, 0.3, 3
    # Algorithm 1 written out: at t % tau == 0 the elastic move; the gradient at the point
    # before the move (here g(x) = x + noise_t)
    x, center = start.clone(), torch.zeros(5, dtype=torch.float64)
    for t in range(20):
        point = x
        if t % tau == 0:
            move = alpha * (x - center)
            x, center = x - move, center + move
        x = x - eta * (point + noise[t])
    for name in ("easgd", "eamsgd"):
        # each name through the factories the runtime uses, so a wrong dispatch would show
        config = AlgorithmConfig(name=name, learning_rate=eta, momentum=0.0, moving_rate=alpha)
        worker = make_worker_role(config, start, comm_period=tau)
        server = make_server_role(config, torch.zeros(5, dtype=torch.float64), num_workers=1)
        for t in range(20):
            worker_step(
                worker,
                lambda p, t=t: (0.0, p + noise[t]),
                lambda payload, server=server: server.handle(0, payload),
            )
        assert torch.allclose(worker.params, x, rtol=0, atol=1e-14), name
        assert torch.allclose(server.center, center, rtol=0, atol=1e-14), name


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_zero_moving_rate_makes_workers_independent(momentum: float) -> None:
    # alpha = 0: the exchange moves nothing, so EASGD/EAMSGD is plain SGD/MSGD on each worker:
    #   v <- delta v - eta g(x + delta v); x <- x + v, with g(x) = x
    x, center = f64(1.5, -0.5), f64(3.0, 3.0)
    velocity = torch.zeros(2, dtype=torch.float64)
    expected_x, expected_v = [1.5, -0.5], [0.0, 0.0]
    for _ in range(10):
        x, center_after, diff = alg.elastic_exchange(x, center, moving_rate=0.0)
        assert torch.equal(center_after, center) and not diff.any()
        look = alg.nesterov_lookahead(x, velocity, momentum=momentum)
        x, velocity = alg.nesterov_step(x, velocity, look, learning_rate=0.1, momentum=momentum)
        for j in range(2):
            look_j = expected_x[j] + momentum * expected_v[j]
            expected_v[j] = momentum * expected_v[j] - 0.1 * look_j
            expected_x[j] = expected_x[j] + expected_v[j]
    assert torch.allclose(x, f64(*expected_x), atol=1e-14)


def test_exchange_conserves_center_plus_workers() -> None:
    generator = torch.Generator().manual_seed(0)
    workers = [torch.randn(7, dtype=torch.float64, generator=generator) for _ in range(4)]
    center = torch.randn(7, dtype=torch.float64, generator=generator)
    total = center + sum(workers)
    for i in [0, 2, 1, 3, 3, 0]:
        workers[i], center, _ = alg.elastic_exchange(workers[i], center, moving_rate=0.3)
    assert torch.allclose(center + sum(workers), total, rtol=0, atol=1e-13)
    # with dyadic values the float arithmetic is exact, so equality is bitwise
    worker, new_center, _ = alg.elastic_exchange(f64(0.75, -1.25), f64(0.25, 0.5), moving_rate=0.5)
    assert torch.equal(worker + new_center, f64(1.0, -0.75))


def test_synchronous_easgd_hand_computed() -> None:
    # p = 2, eta = 0.1, alpha = 0.25, g(x) = x, scalar: x1 = 1, x2 = 3, center = 0
    #   x1 <- 1 - 0.1 - 0.25 = 0.65; x2 <- 3 - 0.3 - 0.75 = 1.95; center <- 0 + 0.25 + 0.75 = 1
    workers, center = alg.synchronous_easgd_step(
        [f64(1), f64(3)], f64(0), [f64(1), f64(3)], learning_rate=0.1, moving_rate=0.25
    )
    assert workers[0].item() == pytest.approx(0.65) and workers[1].item() == pytest.approx(1.95)
    # the spec's second form: (1 - beta) center + beta * mean(x_old), beta = p * alpha = 0.5
    assert center.item() == pytest.approx((1 - 0.5) * 0 + 0.5 * 2.0)


def test_downpour_push_pull_hand_computed() -> None:
    # tau = 2, eta = 0.1, g(x) = x, x0 = center = 1.
    worker = DownpourWorker(f64(1), comm_period=2, learning_rate=0.1)
    server = DownpourServer(f64(1))
    exchange = lambda payload: server.handle(0, payload)  # noqa: E731
    worker_step(worker, quadratic_grad, exchange)  # push a=0, pull 1; x = 0.9, a = -0.1
    worker_step(worker, quadratic_grad, exchange)  # no exchange;     x = 0.81, a = -0.19
    assert worker.params.item() == pytest.approx(0.81)
    assert worker.accumulated.item() == pytest.approx(-0.19)
    server.center = f64(0.5)  # another worker moved the center meanwhile
    worker_step(worker, quadratic_grad, exchange)  # push: center = 0.31, pull; x = 0.279
    assert server.center.item() == pytest.approx(0.31)
    assert worker.params.item() == pytest.approx(0.279)
    assert worker.accumulated.item() == pytest.approx(-0.031)


def test_downpour_with_period_one_is_asynchronous_sgd() -> None:
    # Asynchronous SGD: a worker reads the center, takes g at what it read, and its update
    # -eta g lands on the center when it next talks to the server.
    eta, starts = 0.2, f64(1.0, -1.0)
    server = DownpourServer(starts)
    workers = [DownpourWorker(starts, comm_period=1, learning_rate=eta) for _ in range(3)]
    center = [1.0, -1.0]
    pending: list[list[float]] = [[0.0, 0.0] for _ in range(3)]
    for tick in range(30):
        i = (tick * 7 + tick // 3) % 3  # an irregular order
        worker_step(workers[i], quadratic_grad, lambda payload, i=i: server.handle(i, payload))
        center = [c + d for c, d in zip(center, pending[i], strict=True)]
        read = list(center)
        pending[i] = [-eta * r for r in read]
        assert torch.allclose(server.center, f64(*center), atol=1e-14)


def test_mdownpour_server_nesterov_hand_computed() -> None:
    # delta = 0.5, eta = 0.1, g(y) = y; center 1, v~ 0.
    server = MDownpourServer(f64(1), learning_rate=0.1, momentum=0.5)
    worker = MDownpourWorker(f64(123))
    exchange = lambda payload: server.handle(0, payload)  # noqa: E731
    worker_step(worker, quadratic_grad, exchange)  # reads y = 1; g = 1 is pending
    assert worker.params.item() == 1.0 and server.updates == 0
    worker_step(worker, quadratic_grad, exchange)
    # server: v~ = -0.1, center = 0.9; y = 0.9 + 0.5 * -0.1 = 0.85; the worker's g is now 0.85
    assert server.center.item() == pytest.approx(0.9)
    assert server.velocity.item() == pytest.approx(-0.1)
    assert worker.params.item() == pytest.approx(0.85)
    server.handle(0, worker.final_outgoing())  # v~ = -0.05 - 0.085 = -0.135; center = 0.765
    assert server.center.item() == pytest.approx(0.765)


def test_adownpour_polyak_average_is_mean_of_centers() -> None:
    server = DownpourServer(f64(0), average=True)
    centers = []
    for push in [1.0, 2.0, -0.5, 4.0]:
        server.handle(0, f64(push))
        centers.append(server.center.item())
        assert server.evaluated().item() == pytest.approx(sum(centers) / len(centers))


def test_mvadownpour_constant_rate_hand_computed() -> None:
    server = DownpourServer(f64(0), average=True, average_rate=0.25)
    server.handle(0, f64(4.0))  # center 4; z = 0.75*0 + 0.25*4 = 1
    server.handle(0, f64(4.0))  # center 8; z = 0.75*1 + 0.25*8 = 2.75
    assert server.evaluated().item() == pytest.approx(2.75)


def test_sequential_asgd_and_mvasgd() -> None:
    asgd = SequentialWorker(
        f64(1), learning_rate=0.5, momentum=0.0, average=True, average_rate=None
    )
    for _ in range(3):
        worker_step(asgd, quadratic_grad, lambda _: pytest.fail("no exchange"))
    # x: 0.5, 0.25, 0.125; z = mean = 0.291666...
    assert asgd.params.item() == pytest.approx(0.125)
    assert asgd.evaluated().item() == pytest.approx((0.5 + 0.25 + 0.125) / 3)
    mvasgd = SequentialWorker(
        f64(1), learning_rate=0.5, momentum=0.0, average=True, average_rate=0.5
    )
    worker_step(mvasgd, quadratic_grad, lambda _: pytest.fail("no exchange"))
    assert mvasgd.evaluated().item() == pytest.approx(0.5 * 1 + 0.5 * 0.5)


def test_admm_round_robin_step_hand_computed() -> None:
    # p = 2, active 0, eta = 0.1, rho = 2, g(x) = x: x = (1, 2), lambda = (0, 0), center 0.5
    #   lambda_0 = 0 - (1 - 0.5) = -0.5
    #   x_0 = 1 - 0.1*1 + 0.1*2*(-0.5 - 1 + 0.5) = 0.7
    #   center = mean(0.7 + 0.5, 2 - 0) = 1.6
    workers, duals, center = alg.admm_round_robin_step(
        [f64(1), f64(2)], [f64(0), f64(0)], f64(0.5), f64(1), active=0, learning_rate=0.1, rho=2.0
    )
    assert workers[0].item() == pytest.approx(0.7) and duals[0].item() == pytest.approx(-0.5)
    assert center.item() == pytest.approx(1.6)


def test_moving_rate_from_beta() -> None:
    assert alg.moving_rate_from_beta(0.9, 4) == pytest.approx(0.225)
    assert AlgorithmConfig(name="easgd").resolved_moving_rate(9) == pytest.approx(0.1)
    assert AlgorithmConfig(name="easgd", moving_rate=0.3).resolved_moving_rate(9) == 0.3


@pytest.mark.parametrize(
    ("call", "names"),
    [
        (lambda: alg.sgd_step(f64(1), f64(1), learning_rate=-0.1), "learning_rate"),
        (lambda: alg.nesterov_lookahead(f64(1), f64(1), momentum=1.0), "momentum"),
        (lambda: alg.nesterov_lookahead(f64(1), f64(1), momentum=-0.1), "momentum"),
        (lambda: alg.elastic_difference(f64(1), f64(1), moving_rate=1.0), "moving_rate"),
        (lambda: ElasticServer(f64(1), moving_rate=0.0), "moving_rate"),
        (lambda: alg.is_exchange_step(3, comm_period=0), "comm_period"),
        (lambda: alg.moving_rate_from_beta(0.9, 0), "num_workers"),
        (lambda: AlgorithmConfig(name="adam"), "algorithm.name"),
        (lambda: AlgorithmConfig(name="easgd", learning_rate=-1.0), "algorithm.learning_rate"),
        (lambda: AlgorithmConfig(name="easgd", momentum=0.9), "algorithm.momentum"),
        (lambda: AlgorithmConfig(name="eamsgd", momentum=1.5), "algorithm.momentum"),
        (lambda: AlgorithmConfig(name="easgd", moving_rate=1.5), "algorithm.moving_rate"),
        (lambda: AlgorithmConfig(name="mvasgd"), "algorithm.average_rate"),
    ],
)
def test_invalid_hyperparameters_name_the_parameter(call, names: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=names):
        call()
