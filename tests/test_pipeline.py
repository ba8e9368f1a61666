"""The pipelined exchange over gloo: bit for bit the whole-message exchange, conserving, guarded."""

from __future__ import annotations

import pytest
import torch

from tests import pipeline_targets as targets
from tests.dist_helpers import spawn_world

pytestmark = pytest.mark.slow

EPS32 = 2.0**-24


@pytest.mark.parametrize(
    ("name", "limit"), [("none", None), ("none", 1e6), ("bf16", 1e6), ("int8", None)]
)
def test_pipelined_exchange_is_bit_for_bit_the_whole_message_one(
    name: str, limit: float | None
) -> None:
    # one worker: the order of updates is fixed, so both servers must compute the same bits
    runs = {
        pipelined: spawn_world(targets.exchanges, 2, 6, name, pipelined, -1, limit)
        for pipelined in (True, False)
    }
    assert runs[True][0][3] and not runs[False][0][3]  # each took the path it was asked for
    assert torch.equal(runs[True][0][0], runs[False][0][0])  # the center
    assert torch.equal(runs[True][1][0], runs[False][1][0])  # the worker
    assert runs[True][0][1] == runs[False][0][1] == 6
    assert not torch.equal(runs[True][0][0], torch.linspace(-1, 1, targets.NUMEL))


@pytest.mark.parametrize(("name", "limit"), [("none", None), ("int8", 1e6)])
def test_pipelined_exchanges_conserve_center_plus_workers(name: str, limit: float | None) -> None:
    workers, steps = 2, 8
    results = spawn_world(targets.exchanges, workers + 1, steps, name, True, -1, limit)
    center, exchanges, rejected, used = results[0]
    assert used and set(rejected.values()) == {0} and exchanges == workers * steps
    start = torch.linspace(-1, 1, targets.NUMEL).double()
    total = center.double() + sum(results[r][0].double() for r in (1, 2))
    starts = start + sum(results[r][1].double() for r in (1, 2))
    # float32 variables: each exchange rounds center + e and x_i - e once each (|values| < 4)
    assert float((total - starts).abs().max()) <= exchanges * 2 * EPS32 * 4


@pytest.mark.parametrize(("name", "limit"), [("none", None), ("int8", 1e6)])
def test_pipelined_exchange_refuses_a_non_finite_update(name: str, limit: float | None) -> None:
    workers, steps = 2, 8
    results = spawn_world(targets.exchanges, workers + 1, steps, name, True, 4, limit)
    center, exchanges, rejected, used = results[0]
    assert used and rejected == {1: 1, 2: 0} and exchanges == workers * steps - 1
    assert results[1][2] == 1  # worker 1 was reset to the center once, then went on
    assert bool(torch.isfinite(center).all())
    assert all(bool(torch.isfinite(results[r][0]).all()) for r in (1, 2))
