"""The communication-cost clock: closed-form charges, queueing, and exact reduction to the free clock."""

from __future__ import annotations

import heapq

import pytest
import torch

from easgd.config.algorithm import AlgorithmConfig
from easgd.roles import make_server_role, make_worker_role, worker_step
from easgd.sim import Quadratic, SimConfig, simulate
from easgd.sim.cost import ExchangeCost, ServerQueue, exchange_cost, message_bytes

# latency 0.5 + transfer 0.25 = 0.75 each way, service 1.0: a round trip of 2.5 steps
CHARGES = ExchangeCost(latency=0.5, transfer=0.25, service=1.0)


def quadratic(noise: float = 0.3) -> Quadratic:
    start = torch.linspace(-2, 2, 5, dtype=torch.float64)
    curvature = torch.linspace(0.5, 1.5, 5, dtype=torch.float64)
    return Quadratic(start, curvature=curvature, noise_std=noise)


def test_server_queue_serves_one_exchange_at_a_time_in_arrival_order() -> None:
    queue = ServerQueue(CHARGES)
    first, second = queue.book(0, 0.0), queue.book(1, 0.0)
    assert (first.arrived, first.served, first.done, first.replied) == (0.75, 0.75, 1.75, 2.5)
    # the second arrives with the first and waits for it: 1.0 in the queue
    assert (second.arrived, second.served, second.done, second.replied) == (0.75, 1.75, 2.75, 3.5)
    late = queue.book(0, 10.0)  # the server is idle again: no wait
    assert late.served == late.arrived == 10.75


def test_physical_figures_become_steps() -> None:
    # 1000 floats + 64-byte header = 4064 bytes = 32512 bits; 1 Gb/s: 32.512 us; step 1 ms
    charges = exchange_cost(
        latency_s=50e-6, bandwidth_gbps=1.0, service_s=10e-6, num_params=1000, step_time_s=1e-3
    )
    assert message_bytes(1000) == 4064
    assert charges.latency == pytest.approx(0.05)
    assert charges.transfer == pytest.approx(0.032512)
    assert charges.service == pytest.approx(0.01)
    assert charges.round_trip == pytest.approx(2 * (0.05 + 0.032512) + 0.01)


def test_two_blocking_workers_closed_form_event_times() -> None:
    """tau = 2, both workers due at t = 0; worker 1 queues behind worker 0 for one service time.

    w0: sent 0, served 0.75, reply 2.5 -> steps at 2.5, 3.5 -> due at 4.5: served 5.25, reply 7.0
    w1: sent 0, served 1.75 (waited 1.0), reply 3.5 -> steps at 3.5, 4.5 -> due at 5.5:
        arrives 6.25 when the server frees up at 6.25, served 6.25 (after the run ends at 6)
    """
    sim = SimConfig(
        num_workers=2, comm_period=2, duration=6.0, eval_interval=100, cost=CHARGES,
        record_exchanges=True,
    )  # fmt: skip
    result = simulate(
        AlgorithmConfig("easgd", learning_rate=0.1, moving_rate=0.3), sim, quadratic()
    )
    got = [(e.worker, e.sent, e.arrived, e.served, e.done, e.replied) for e in result.exchange_log]
    assert got == [
        (0, 0.0, 0.75, 0.75, 1.75, 2.5),
        (1, 0.0, 0.75, 1.75, 2.75, 3.5),
        (0, 4.5, 5.25, 5.25, 6.25, 7.0),
        (1, 5.5, 6.25, 6.25, 7.25, 8.0),  # in flight at the end: still reaches the server
    ]
    assert result.exchanges == 4
    assert result.steps == 4  # two gradient steps each before t = 6
    assert result.stop_reason == "duration"


def test_one_blocking_worker_pays_a_round_trip_every_tau_steps() -> None:
    # a cycle is tau = 4 steps + 2.5 of round trip = 6.5: ten cycles in 65 time units
    sim = SimConfig(num_workers=1, comm_period=4, duration=65.0, cost=CHARGES)
    result = simulate(
        AlgorithmConfig("easgd", learning_rate=0.1, moving_rate=0.3), sim, quadratic()
    )
    assert (result.steps, result.exchanges) == (40, 10)


def test_overlapping_worker_keeps_stepping_and_waits_only_for_its_previous_exchange() -> None:
    # sends at 0 and steps at 0, 1; due at 2 but the reply lands at 2.5: sends at 2.5, steps at
    # 2.5, 3.5; due at 4.5, reply at 5.0: sends at 5.0
    sim = SimConfig(
        num_workers=1, comm_period=2, duration=6.0, cost=CHARGES, overlap=True,
        record_exchanges=True,
    )  # fmt: skip
    result = simulate(
        AlgorithmConfig("eamsgd", learning_rate=0.1, momentum=0.5, moving_rate=0.3),
        sim,
        quadratic(),
    )
    assert [e.sent for e in result.exchange_log] == [0.0, 2.5, 5.0]
    assert result.steps == 5  # at 0, 1, 2.5, 3.5 and 5.0 (the next, at 6.0, is past the end)


def reference_free_clock(
    algorithm: AlgorithmConfig, objective: Quadratic, *, workers: int, period: int,
    duration: float, slowdown: list[float], seed: int,
) -> tuple[list[float], torch.Tensor]:  # fmt: skip
    """Today's clock written out independently: (time, worker) heap, ties to the lower worker."""
    start = objective.initial_point()
    roles = [make_worker_role(algorithm, start, comm_period=period) for _ in range(workers)]
    server = make_server_role(algorithm, start, num_workers=workers)
    generators = [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in range(workers)]
    events = [(0.0, w) for w in range(workers)]
    times = []
    while events and events[0][0] < duration:
        time, w = heapq.heappop(events)
        times.append(time)
        worker_step(
            roles[w],
            lambda point, g=generators[w]: objective.gradient(point, g),
            lambda payload, w=w: server.handle(w, payload),
        )
        heapq.heappush(events, (time + slowdown[w], w))
    for w, role in enumerate(roles):
        final = role.final_outgoing()
        if final is not None:
            server.handle(w, final)
    return times, server.evaluated()


@pytest.mark.parametrize(
    "algorithm,period",
    [
        (AlgorithmConfig("eamsgd", learning_rate=0.05, momentum=0.9, moving_rate=0.2), 3),
        (AlgorithmConfig("downpour", learning_rate=0.05), 1),
        (AlgorithmConfig("mdownpour", learning_rate=0.02, momentum=0.9), 1),
    ],
)
def test_zero_charges_replay_the_free_clock_bit_for_bit(
    algorithm: AlgorithmConfig, period: int
) -> None:
    # slowdowns with ties (1.0 and 0.5 meet at every integer) exercise the tie rule
    slowdown = [1.0, 0.5, 1.5, 1.0]
    common = dict(num_workers=4, comm_period=period, duration=60.0, eval_interval=7.0,
                  slowdown=slowdown, seed=3)  # fmt: skip
    free = simulate(algorithm, SimConfig(**common), quadratic())  # type: ignore[arg-type]
    costed = simulate(algorithm, SimConfig(**common, cost=ExchangeCost()), quadratic())  # type: ignore[arg-type]
    assert costed.history == free.history  # times, steps, exchanges, losses and errors
    assert torch.equal(costed.evaluated, free.evaluated)
    for a, b in zip(costed.workers, free.workers, strict=True):
        assert torch.equal(a, b)
    _, center = reference_free_clock(
        algorithm, quadratic(), workers=4, period=period, duration=60.0, slowdown=slowdown, seed=3
    )
    assert torch.equal(costed.evaluated, center)


def test_communication_cost_slows_tau_1_more_than_tau_16() -> None:
    cost = ExchangeCost(latency=0.2, transfer=0.1, service=0.05)
    algorithm = AlgorithmConfig("easgd", learning_rate=0.05, moving_rate=0.2)
    steps = {}
    for period in (1, 16):
        sim = SimConfig(num_workers=4, comm_period=period, duration=100.0, cost=cost)
        steps[period] = simulate(algorithm, sim, quadratic()).steps
    # tau = 1: every step pays >= 0.65 of round trip; tau = 16 pays it once in 16 steps
    assert steps[1] <= 4 * 100 / 1.65 + 4
    assert steps[16] >= 4 * 100 * 16 / (16 + 0.65 + 3 * 0.05) - 4


def test_cost_needs_the_asynchronous_schedule_and_overlap_is_elastic_only() -> None:
    with pytest.raises(ValueError, match="asynchronous"):
        SimConfig(schedule="round_robin", cost=CHARGES)
    # the synchronous schedule charges each round as a ring all-reduce (issue 20): no overlap
    with pytest.raises(ValueError, match="with sim.overlap"):
        SimConfig(schedule="synchronous", cost=CHARGES, overlap=True)
    with pytest.raises(ValueError, match="push_delay"):
        SimConfig(push_delay=1.0, cost=CHARGES)
    with pytest.raises(ValueError, match="overlap"):
        simulate(
            AlgorithmConfig("downpour", learning_rate=0.1),
            SimConfig(num_workers=2, comm_period=1, duration=5, cost=CHARGES, overlap=True),
            quadratic(),
        )
    with pytest.raises(ValueError, match="service"):
        ExchangeCost(service=-1.0)
