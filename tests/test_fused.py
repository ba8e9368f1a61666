"""The compiled one-pass elastic update: bit for bit the eager update, used by the server's handle."""

from __future__ import annotations

import pytest
import torch

from easgd.algorithms import fused, inplace
from easgd.algorithms.fused import FusedElasticUpdate
from easgd.roles import ElasticServer

NUMEL = 4099  # not a multiple of any vector width


def _built() -> FusedElasticUpdate:
    update = FusedElasticUpdate(NUMEL, moving_rate=0.3, background=False)
    if not update.ready.is_set():
        pytest.skip(f"torch.compile cannot build here: {update.error}")
    return update


def test_compiled_update_is_bit_for_bit_the_eager_one() -> None:
    update = _built()
    generator = torch.Generator().manual_seed(0)
    center, worker = torch.randn(2, NUMEL, generator=generator)
    eager_center, eager_worker = center.clone(), worker.clone()
    assert update(center, worker, worker)
    inplace.elastic_update_(eager_center, eager_worker, eager_worker, moving_rate=0.3)
    assert torch.equal(center, eager_center) and torch.equal(worker, eager_worker)
    # another size, another buffer for the reply or another dtype: not applied, left to eager
    assert not update(center, worker, torch.empty(NUMEL))
    assert not update(center, worker[:-1], worker[:-1])
    assert not update(center.double(), worker.double(), worker.double())


def test_server_handle_uses_it_and_replies_as_the_eager_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _built()  # skips where it cannot build
    monkeypatch.setattr(fused, "FUSED_MIN_VALUES", 1)
    start = torch.randn(NUMEL, generator=torch.Generator().manual_seed(1))
    compiled, eager = ElasticServer(start, moving_rate=0.3), ElasticServer(start, moving_rate=0.3)
    compiled.compile_update(background=False)
    assert compiled.fused is not None and compiled.fused.ready.is_set()
    for step in range(3):
        payload = start + step + 0.5
        expected = eager.handle(0, payload.clone(), out=None)
        received = payload.clone()
        assert torch.equal(compiled.handle(0, received, out=received), expected)
        assert torch.equal(compiled.center, eager.center)
    assert compiled.updates == eager.updates == 3


def test_disabled_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EASGD_COMPILE", "0")
    monkeypatch.setattr(fused, "FUSED_MIN_VALUES", 1)
    role = ElasticServer(torch.zeros(10), moving_rate=0.3)
    role.compile_update(background=False)
    assert role.fused is None


def test_parts_update_as_the_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    _built()  # skips where it cannot build
    monkeypatch.setattr(fused, "FUSED_MIN_VALUES", 1)
    start = torch.randn(3 * NUMEL, generator=torch.Generator().manual_seed(2))
    parts, whole = ElasticServer(start, moving_rate=0.3), ElasticServer(start, moving_rate=0.3)
    parts.compile_update(background=False, part_values=NUMEL)
    assert parts.fused_part is not None and parts.fused_part.ready.is_set()
    payload = start + 0.25
    expected = whole.handle(0, payload.clone())
    received = payload.clone()
    for index in range(3):  # the last part is not the compiled size: eager, the same bits
        part = slice(index * NUMEL, (index + 1) * NUMEL + (index == 2))
        parts.update_part(received[part], part)
    parts.count_update()
    assert torch.equal(received, expected) and torch.equal(parts.center, whole.center)
