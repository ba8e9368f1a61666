"""The sharded snapshot cut (BarrierCut), in process: which replies are marked, which messages
wait, and what state each shard's part holds. The end-to-end kill + resume with a conservation
audit is in test_sharded.py."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from easgd.comm.message import Header, Op
from easgd.recovery.sharded_snapshot import BarrierCut


class Host:
    """A stand-in for one shard's ParameterServer: a lock and a counter as its state."""

    def __init__(self, running: list[int]) -> None:
        self.lock = threading.Lock()
        self.value = 0
        self.running = running
        self.failing = False

    def running_workers(self) -> list[int]:
        return list(self.running)

    def state_copy(self) -> dict[str, Any]:
        return {"value": self.value}

    def failed(self) -> bool:
        return self.failing


def exchange(tag: int = 0) -> Header:
    return Header(Op.EXCHANGE, saved_snapshot=tag)


def serve(host: Host, cut: BarrierCut, rank: int, header: Header, change: int) -> int:
    """What a serve thread does: the cut first, then the update, both under the lock."""
    with host.lock:
        mark = cut.on_message(rank, header)
        host.value += change
    return mark


def in_thread(*args: Any) -> tuple[threading.Thread, list[int]]:
    out: list[int] = []
    thread = threading.Thread(target=lambda: out.append(serve(*args)), daemon=True)
    thread.start()
    return thread, out


def blocked(thread: threading.Thread) -> bool:
    thread.join(timeout=0.3)
    return thread.is_alive()


def test_lead_marks_each_running_worker_once_and_copies_when_both_crossed() -> None:
    host = Host([1, 2])
    cut = BarrierCut(lead=True, next_number=5)
    cut.bind(host)
    assert serve(host, cut, 1, exchange(), 1) == 0  # before the start: not marked
    with host.lock:
        assert cut.begin(host.running_workers()) == 5 and cut.in_progress
        with pytest.raises(RuntimeError, match="still in progress"):  # one at a time
            cut.begin(host.running_workers())
    assert serve(host, cut, 1, exchange(), 2) == 5  # first exchange after the start: marked
    assert serve(host, cut, 2, exchange(), 4) == 5
    # worker 1 saved and tags its next message: it waits for worker 2 to cross the cut too
    first, _ = in_thread(host, cut, 1, exchange(5), 100)
    assert blocked(first)
    assert serve(host, cut, 2, exchange(5), 1000) == 0  # the last one: the part is copied first
    first.join(timeout=5)
    assert not first.is_alive()
    with host.lock:
        assert cut.take_parts() == [(5, {"value": 1 + 2 + 4})]
        assert cut.complete() == 5 and cut.complete() is None  # reported once, to the writer
    assert host.value == 1107 and cut.last_captured == 5 and not cut.in_progress
    assert serve(host, cut, 1, exchange(5), 1) == 0  # later messages pass (no reply marked)


def test_a_shard_waits_for_every_exchange_inside_the_cut_even_if_it_arrives_late() -> None:
    # shard j > 0 learns of snapshot 3 from worker 1's tag, while worker 2's last exchange
    # inside the cut (marked by the lead) has not reached this shard yet
    host = Host([1, 2])
    cut = BarrierCut(lead=False)
    cut.bind(host)
    tagged, mark = in_thread(host, cut, 1, exchange(3), 100)
    assert blocked(tagged) and cut.in_progress
    assert serve(host, cut, 2, exchange(), 10) == 0  # inside the cut: served at once
    assert blocked(tagged)
    assert serve(host, cut, 2, exchange(3), 1000) == 0
    tagged.join(timeout=5)
    with host.lock:
        parts = cut.take_parts()
    assert parts == [(3, {"value": 10})]  # both inside, neither tagged message
    assert mark == [0] and host.value == 1110


def test_done_crosses_the_cut_after_its_last_payload() -> None:
    host = Host([1, 2])
    cut = BarrierCut(lead=False)
    cut.bind(host)
    tagged, _ = in_thread(host, cut, 1, exchange(1), 100)
    assert blocked(tagged)
    # the server applies a DONE's last payload before telling the cut (ParameterServer's order)
    with host.lock:
        host.value += 7
        host.running.remove(2)
        assert cut.on_message(2, Header(Op.DONE, saved_snapshot=0)) == 0
    tagged.join(timeout=5)
    with host.lock:
        assert cut.take_parts() == [(1, {"value": 7})]


@pytest.mark.parametrize("how", ["dropped", "failed"])
def test_a_lost_worker_does_not_leave_the_others_waiting(how: str) -> None:
    host = Host([1, 2])
    cut = BarrierCut(lead=False, poll_s=0.01)
    cut.bind(host)
    tagged, _ = in_thread(host, cut, 1, exchange(2), 100)
    assert blocked(tagged)
    started = time.perf_counter()
    with host.lock:
        if how == "dropped":  # worker_failure=continue: the snapshot goes on without it
            cut.drop(2)
        else:  # fail_fast: the run ends, no snapshot can complete
            host.failing = True
    tagged.join(timeout=5)
    assert not tagged.is_alive() and time.perf_counter() - started < 2
    with host.lock:
        parts = cut.take_parts()
    assert parts == ([(2, {"value": 0})] if how == "dropped" else [])
    assert host.value == 100


def test_the_final_snapshot_number_is_above_every_started_one() -> None:
    host = Host([])
    cut = BarrierCut(lead=True, next_number=4)
    cut.bind(host)
    with host.lock:
        assert cut.begin([]) == 4  # no worker running: copied at once
        assert cut.take_parts() == [(4, {"value": 0})]
        assert cut.abandon() == 5 and cut.begin([]) == 6


def test_only_the_lead_shard_starts_snapshots() -> None:
    cut = BarrierCut(lead=False)
    cut.bind(Host([1]))
    with pytest.raises(RuntimeError, match="only the lead shard"):
        cut.begin([1])
