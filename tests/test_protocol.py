"""Protocol tests with a real server and workers on gloo (spawned processes, CPU)."""

from __future__ import annotations

import random

import pytest
import torch

from easgd.comm.message import Header, Op
from easgd.comm.transport import Delay
from tests import protocol_targets as targets
from tests.dist_helpers import spawn_world

pytestmark = pytest.mark.slow


def test_header_round_trips_through_its_encoding() -> None:
    header = Header(
        Op.EXCHANGE,
        step=2**40,
        has_payload=True,
        stop=True,
        error=2,
        train_loss=0.25,
        latency_ms=1.5,
        staleness=7,
        num_params=9610,
        steps_per_s=812.5,
        snapshot=3,
        saved_snapshot=2,
        redone_steps=41,
    )
    assert Header.decode(header.encode()) == header


def test_jitter_stays_within_its_bounds_and_is_seeded() -> None:
    delay = Delay(latency_ms=10.0, jitter_ms=20.0)
    first = [delay.sample_s(random.Random(3)) for _ in range(1)] + [
        delay.sample_s(random.Random(3))
    ]
    assert first[0] == first[1]
    samples = [delay.sample_s(random.Random(seed)) for seed in range(200)]
    assert all(0.010 <= s <= 0.030 for s in samples)
    assert max(samples) - min(samples) > 0.015


@pytest.mark.parametrize("overlap", [False, True])
def test_concurrent_elastic_exchanges_conserve_center_plus_workers(overlap: bool) -> None:
    workers, steps = 3, 60
    results = spawn_world(targets.conservation, workers + 1, steps, overlap)
    center, exchanges = results[0]
    start = torch.linspace(-1, 1, targets.NUMEL, dtype=torch.float64)
    total = center + sum(results[r][0] for r in range(1, workers + 1))
    # a join adds the worker's starting point and leaves the center alone; every exchange after
    # that moves the worker and the center by equal and opposite amounts
    starts = sum(results[r][1] for r in range(1, workers + 1))
    assert exchanges == workers * steps
    assert torch.allclose(total, start + starts, rtol=0, atol=1e-12)
    assert not torch.allclose(center, start)  # the exchanges did move the center
    if overlap:
        # a reply is applied one step after its exchange was sent, never later: the next
        # exchange (tau = 1: the next step) first waits for the one in flight
        assert {results[r][3] for r in range(1, workers + 1)} == {1}


def test_downpour_pushes_sum_exactly_into_the_center() -> None:
    workers, steps, period = 3, 40, 4
    results = spawn_world(targets.downpour_sum, workers + 1, steps, period)
    center, exchanges = results[0]
    pushed_steps = steps - period  # pushes at t = 0, 4, ..., 36; the last 4 steps are never pushed
    expected = -sum(results[r] for r in range(1, workers + 1)) * pushed_steps
    assert exchanges == workers * steps // period
    assert torch.equal(center, expected)


def test_injected_latency_delays_each_message() -> None:
    times = spawn_world(targets.latency, 2, 60.0, 5)[1]
    assert min(times) >= 0.060
    assert sum(times) / len(times) < 0.060 + 0.1
