"""Liveness rules of the heartbeat monitor, with a fake store and a fake clock."""

from __future__ import annotations

import time

import pytest

from easgd.comm import heartbeat
from easgd.comm.heartbeat import HeartbeatError, HeartbeatMonitor, LoopHeartbeat


class FakeStore:
    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}
        self.broken = False

    def check(self, keys: list[str]) -> bool:
        if self.broken:
            raise ConnectionError("store gone")
        return all(k in self.values for k in keys)

    def get(self, key: str) -> bytes:
        return self.values[key]

    def set(self, key: str, value: str) -> None:
        self.values[key] = value.encode()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [100.0]
    monkeypatch.setattr(heartbeat.time, "monotonic", lambda: now[0])
    return now


def test_allowance_follows_the_measured_pace() -> None:
    monitor = HeartbeatMonitor(FakeStore(), timeout_s=2.0, first_step_s=60.0)  # type: ignore[arg-type]
    assert monitor.allowance_s("") == 60.0  # nothing published yet: warm-up
    assert monitor.allowance_s("1 0.000000") == 60.0  # one step: no pace measured yet
    assert monitor.allowance_s("50 0.010000") == 2.0  # fast worker: the floor
    assert monitor.allowance_s("50 3.000000") == 30.0  # 3 s per step: 10 steps' worth


def test_silent_worker_is_stale_after_its_allowance_and_a_served_one_is_not(
    clock: list[float],
) -> None:
    store = FakeStore()
    monitor = HeartbeatMonitor(store, timeout_s=2.0, first_step_s=60.0)  # type: ignore[arg-type]
    store.values = {"heartbeat/1": b"10 0.01", "heartbeat/2": b"10 0.5"}
    monitor.watch(1)
    monitor.watch(2)
    assert monitor.stale() == {}
    clock[0] += 3.0  # both silent for 3 s: over worker 1's 2 s, under worker 2's 5 s
    assert list(monitor.stale()) == [1]
    assert list(monitor.stale(ignore={1})) == []  # being served: not its silence
    store.values["heartbeat/2"] = b"11 0.5"  # worker 2's loop advanced
    clock[0] += 4.0
    assert list(monitor.stale()) == [1]
    clock[0] += 6.0  # worker 2 silent 6 s > 5 s
    assert sorted(monitor.stale()) == [1, 2]


def test_store_errors_are_not_silence_but_raise_after_the_timeout(clock: list[float]) -> None:
    store = FakeStore()
    monitor = HeartbeatMonitor(store, timeout_s=2.0, first_step_s=60.0)  # type: ignore[arg-type]
    store.values = {"heartbeat/1": b"10 0.01"}
    monitor.watch(1)
    monitor.stale()
    store.broken = True
    clock[0] += 5.0
    assert monitor.stale() == {}  # the store failed: no worker is declared hung
    clock[0] += 3.0
    with pytest.raises(HeartbeatError, match="unreachable"):
        monitor.stale()


def test_the_first_measured_pace_is_published_at_once_not_at_the_next_tick() -> None:
    # a worker stopped (SIGSTOP) within its first publishing interval must leave its pace in the
    # store, or the monitor keeps it in the warm-up allowance (comm.timeout_s) instead of seconds
    store = FakeStore()
    beat = LoopHeartbeat(store, 3, interval_s=60.0).start()  # type: ignore[arg-type]
    try:
        time.sleep(0.05)  # the thread's own first publish has happened: "0 0.000000"
        beat.beat()
        beat.beat()  # the second step measures the first pace
        deadline = time.monotonic() + 5.0
        while store.values["heartbeat/3"].startswith(b"0 ") and time.monotonic() < deadline:
            time.sleep(0.005)
        progress, pace = store.values["heartbeat/3"].decode().split()
        assert progress == "2" and float(pace) > 0  # long before the 60 s tick
        monitor = HeartbeatMonitor(store, timeout_s=1.0, first_step_s=120.0)  # type: ignore[arg-type]
        assert monitor.allowance_s(store.values["heartbeat/3"].decode()) == 1.0  # not warm-up
    finally:
        beat.stop()
