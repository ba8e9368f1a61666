"""Workers that come and go (membership.mode=elastic): the store protocol and the center's
recovery in process, then real torchrun runs where a worker, or the server, is killed."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from easgd.analysis.audit import membership_gap
from easgd.comm import membership
from easgd.config.schema import membership_mode, validate
from easgd.engine.members import LEDGER_BASE, ledger_path, own_ledger_path, recover_center
from tests.dist_helpers import free_port, own_ledgers_match
from tests.test_train_e2e import run

# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, named",
    [
        ({"topology": "allreduce"}, "topology=allreduce"),
        ({"server": {"shards": 2}}, "server.shards=2"),
        ({"mode": "simulate"}, "mode=simulate"),
        ({"algorithm": {"name": "sgd"}, "workers": 1}, "a sequential baseline"),
    ],
)
def test_elastic_membership_is_refused_where_it_is_not_served(overrides: dict, named: str) -> None:
    cfg = {"membership": {"mode": "elastic"}, **overrides}
    with pytest.raises(ValueError, match=re.escape(named) + ".*use membership.mode=fixed"):
        validate(cfg)


def test_bad_membership_values_name_the_key() -> None:
    with pytest.raises(ValueError, match="membership.mode='sometimes'"):
        validate({"membership": {"mode": "sometimes"}})
    with pytest.raises(ValueError, match="membership.slot_wait_s must be > 0"):
        validate({"membership": {"slot_wait_s": 0}})


TORCHRUN = {"TORCHELASTIC_USE_AGENT_STORE": "True"}  # what torchrun's agent sets by default


@pytest.mark.parametrize(
    "overrides, environ, resolved",
    [
        ({}, TORCHRUN, "elastic"),  # the README's main job
        ({}, {}, "fixed"),  # no shared store (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, or none)
        ({"topology": "allreduce"}, TORCHRUN, "fixed"),
        ({"server": {"shards": 2}}, TORCHRUN, "fixed"),
        ({"mode": "simulate"}, TORCHRUN, "fixed"),
        ({"algorithm": {"name": "msgd"}, "workers": 1}, TORCHRUN, "fixed"),
        ({"checkpoint": {"ledger": True}}, TORCHRUN, "fixed"),
        ({"fault": {"kill_rank": 2, "kill_at_step": 5}}, TORCHRUN, "fixed"),  # a drill
        ({"membership": {"mode": "fixed"}}, TORCHRUN, "fixed"),
        ({"membership": {"mode": "elastic"}}, {}, "elastic"),  # asked for: run_member refuses
    ],
)
def test_auto_membership_is_elastic_only_where_it_is_served(
    overrides: dict, environ: dict, resolved: str
) -> None:
    assert membership_mode(validate(overrides), environ) == resolved


# -- the store protocol ------------------------------------------------------------------------


@pytest.fixture
def store() -> dist.Store:
    return dist.TCPStore("127.0.0.1", free_port(), 1, is_master=True, wait_for_workers=False)


def _client(store: dist.TCPStore) -> dist.Store:
    """Another connection to ``store`` (a process of its own would have one)."""
    return dist.TCPStore("127.0.0.1", store.port, 1, is_master=False)


def test_a_slot_is_held_by_one_process_and_a_worker_beyond_p_is_refused(store) -> None:
    assert membership.claim(store, [1, 2], "a") == 1
    assert membership.claim(store, [1, 2], "b") == 2
    assert membership.claim(store, [1, 2], "c") is None  # both held
    membership.start_server_epoch(store)
    with pytest.raises(membership.SlotRefused, match="all 2 worker slots are held"):
        membership.join(store, [1, 2], workers=2, timeout_s=5)
    store.set("member/2/owner", "")  # the server frees a slot when its member leaves
    assert membership.claim(store, [1, 2], "c") == 2


def test_a_finished_slot_takes_no_new_member(store) -> None:
    """A member that dies after its DONE was applied (on its way out) is started again by its
    keeper: the new one must leave at once, not wait for a group the server never opens."""
    membership.start_server_epoch(store)
    listener = membership.SlotListener(store, epoch=1, timeout_s=5)
    assert membership.claim(store, [1, 2], "a") == 1
    listener.release(1, finished=True)  # slot 1 said DONE
    assert membership.claim(store, [1, 2], "b") == 2  # a joining node skips the finished slot
    listener.release(2)  # slot 2's member died: free again, not finished
    assert membership.claim(store, [2], "c") == 2
    with pytest.raises(membership.SlotFinished, match="slot 1 has finished its budget"):
        membership.join(store, [1], workers=2, timeout_s=5, claim_wait_s=5)
    assert store.get("member/1/owner") == b""  # nothing was claimed


def test_a_member_waits_for_a_newer_server_and_the_run_end_is_told(store) -> None:
    with pytest.raises(TimeoutError, match="no server came up"):
        membership.wait_for_server(store, after=0, timeout_s=0.2)
    assert membership.start_server_epoch(store) == 1
    assert membership.wait_for_server(store, after=0, timeout_s=1) == 1
    assert membership.start_server_epoch(store) == 2  # a restarted server: the next epoch
    assert membership.wait_for_server(store, after=1, timeout_s=1) == 2
    membership.mark_run_over(store)
    with pytest.raises(membership.RunOver):
        membership.wait_for_server(store, after=2, timeout_s=1)


def test_member_and_server_meet_on_a_fresh_group_per_member(store) -> None:
    epoch = membership.start_server_epoch(store)
    listener = membership.SlotListener(store, epoch=epoch, timeout_s=10)
    stop = threading.Event()
    got: dict[str, object] = {}
    thread = threading.Thread(
        target=lambda: got.update(server=listener.wait(3, stop, give_up_s=10))
    )
    thread.start()
    member = membership.join(_client(store), [3], workers=3, timeout_s=10)
    thread.join()
    number, group = got["server"]  # type: ignore[misc]
    assert (member.slot, member.incarnation, number, member.epoch) == (3, 1, 1, 1)
    sent = torch.arange(5, dtype=torch.float32)
    received = torch.zeros(5)
    work = group.recv([received], membership.MEMBER_END, 0)
    member.group.send([sent], membership.SERVER_END, 0).wait()
    work.wait()
    assert torch.equal(received, sent)


# -- the center's recovery ---------------------------------------------------------------------


def test_a_restarted_server_rebuilds_the_center_from_the_base_and_the_ledgers(
    tmp_path: Path,
) -> None:
    start = torch.tensor([1.0, -2.0, 0.5])
    (tmp_path / "ledger-slot9-1.pt").write_bytes(b"")  # an earlier job's: dropped
    base = recover_center(tmp_path, start, first_start=True)
    assert torch.equal(base, start.double()) and not (tmp_path / "ledger-slot9-1.pt").exists()
    torch.save(torch.tensor([0.25, 0.0, -1.0], dtype=torch.float64), ledger_path(tmp_path, 1, 1))
    torch.save(torch.tensor([0.0, 4.0, 0.125], dtype=torch.float64), ledger_path(tmp_path, 2, 3))
    torch.save(torch.tensor([9.0, 9.0, 9.0], dtype=torch.float64), own_ledger_path(tmp_path, 2, 3))
    rebuilt = recover_center(tmp_path, torch.zeros(3), first_start=False)
    # base + the two ledgers; a member's own copy (for the audit) is not counted
    assert torch.equal(rebuilt, torch.tensor([1.25, 2.0, -0.375], dtype=torch.float64))
    assert torch.equal(torch.load(tmp_path / LEDGER_BASE), start.double())


class _DiesBeforeItsReply:
    """A member as the server sees it: HELLO, one exchange of ``x``, then gone before the reply."""

    numel, recv_timeout_s = 3, 60.0

    def __init__(self, x: torch.Tensor) -> None:
        from easgd.comm.message import Header, Op

        self.inbox = [(Header(Op.EXCHANGE, step=10), x)]
        self.hello = (Header(Op.HELLO, num_params=3), None)

    def recv_control(self):  # type: ignore[no-untyped-def]
        return self.hello

    def recv(self):  # type: ignore[no-untyped-def]
        return self.inbox.pop(0)

    def send(self, header, payload=None) -> None:  # type: ignore[no-untyped-def]
        raise RuntimeError("Connection closed by peer")  # the exchange's reply

    def send_control(self, header, payload=None) -> None:  # type: ignore[no-untyped-def]
        pass  # the HELLO's answer


def test_an_exchange_applied_but_never_answered_is_in_the_departed_members_ledger(
    store, tmp_path: Path
) -> None:
    """The member dies between the server's update and its reply: the center has the elastic
    difference, so the ledger the server writes for the departed member must have it too
    (center == base + ledgers; it missed it, and a node kill broke the audit by 0.01)."""
    from easgd.config.algorithm import AlgorithmConfig
    from easgd.engine.members import ElasticServer
    from easgd.roles import make_server_role

    base = torch.zeros(3, dtype=torch.float64)
    role = make_server_role(AlgorithmConfig("easgd", moving_rate=0.25), base.clone(), num_workers=1)

    class OneMember:
        def __init__(self) -> None:
            self.given, self.store = False, store

        def wait(self, slot, stop, *, give_up_s):  # type: ignore[no-untyped-def]
            if self.given:
                return None
            self.given = True
            return 1, None

        def release(self, slot: int, *, finished: bool = False) -> None:
            pass

    x = torch.tensor([4.0, -8.0, 2.0], dtype=torch.float64)
    server = ElasticServer(
        role, [1], OneMember(), lambda slot, group: _DiesBeforeItsReply(x.clone()),  # type: ignore[arg-type,return-value]
        ledger_dir=tmp_path, slot_wait_s=0.2, ledger="reply",
    )  # fmt: skip
    server.start()
    for thread in server._threads.values():
        thread.join(timeout=30)
    expected = 0.25 * (x - base)  # e = alpha (x - center), applied to the center
    assert torch.equal(role.center, expected)
    assert torch.equal(torch.load(ledger_path(tmp_path, 1, 1)), expected)


# -- real runs -------------------------------------------------------------------------------

ELASTIC = [
    "membership.mode=elastic", "progress=false", "tensorboard=false", "workers=3",
    "steps_per_worker=1500", "checkpoint.every_s=0.5",
]  # fmt: skip


def _torchrun(tmp_path: Path, *overrides: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    result = run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
         "--max-restarts=0", "-m", "easgd.train", *ELASTIC, f"hydra.run.dir={tmp_path}",
         *overrides],
        timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return result, json.loads((tmp_path / "summary.json").read_text())


@pytest.mark.slow
def test_a_killed_worker_is_replaced_and_nothing_else_restarts(tmp_path: Path) -> None:
    result, summary = _torchrun(tmp_path, "fault.kill_rank=2", "fault.kill_at_step=300")
    log = result.stderr
    assert log.count("server start ") == 1  # one server process all along
    assert log.count("the child ended with signal SIGKILL; starting a new one") == 1
    assert "[keeper2] WARNING the child ended with signal SIGKILL" in log
    for slot in (1, 3):  # the other workers joined once and were never replaced
        assert log.count(f"joined slot {slot} as member") == 1
    joined = re.findall(r"joined slot 2 as member 2 at step (\d+)", log)
    left = re.findall(r"slot 2: member 1 left at step (\d+)", log)
    assert joined == left and int(left[0]) % 10 == 0 and int(left[0]) <= 300  # its last exchange
    figures = summary["details"]["membership"]
    assert (figures["members_joined"], figures["members_left"]) == (4, 1)
    assert figures["mode"] == "elastic" and len(figures["rejoin_s"]) == 1  # the one replacement
    redone = summary["details"]["redone_steps_by_worker"]
    assert redone["1"] == redone["3"] == 0
    assert 0 < redone["2"] <= 300 - int(left[0])  # only the dead worker's steps since its exchange
    assert summary["worker_steps"] == 3 * 1500  # every slot finished its budget
    assert summary["restarts"] == 0  # neither the job nor the server restarted
    assert own_ledgers_match(tmp_path / "checkpoints") == 3
    assert membership_gap(tmp_path) < 2e-5  # center == base + every member's ledger


@pytest.mark.slow
def test_a_killed_server_comes_back_with_the_exact_center_and_no_worker_restarts(
    tmp_path: Path,
) -> None:
    result, summary = _torchrun(tmp_path, "fault.kill_rank=0", "fault.kill_at_step=200")
    log = result.stderr
    assert "[keeper0] WARNING the child ended with signal SIGKILL; starting a new one" in log
    assert log.count("server start 2") == 1
    for slot in (1, 2, 3):  # each worker process lived through it
        assert f"[keeper{slot}] WARNING" not in log
        assert log.count(f"joined slot {slot} as member") == 1
    assert (
        log.count("rejoined the server (start 2)")
        == summary["details"]["membership"]["members_rejoined"]
    )
    assert summary["worker_steps"] == 3 * 1500
    assert summary["restarts"] == 1  # the server's one restart
    assert sum(summary["details"]["redone_steps_by_worker"].values()) == 0  # no steps lost
    assert own_ledgers_match(tmp_path / "checkpoints") == 3
    assert membership_gap(tmp_path) < 2e-5  # nothing the dead server had applied was lost


def test_a_restarted_server_connects_only_to_members_joining_it(store) -> None:
    """A join announced to the dead server (epoch 1) is skipped; the member's join to the new
    server (epoch 2) gets a fresh group under a new connection number."""
    first = membership.start_server_epoch(store)
    # a member announces its join to the first server, which dies before it connects
    with pytest.raises(dist.DistStoreError):
        membership.join(_client(store), [2], workers=2, timeout_s=1)
    membership.free_slots(store, [1, 2])
    listener = membership.SlotListener(
        store, epoch=membership.start_server_epoch(store), timeout_s=10
    )
    got: dict[str, object] = {}
    thread = threading.Thread(
        target=lambda: got.update(server=listener.wait(2, threading.Event(), give_up_s=10))
    )
    thread.start()
    again = membership.join(_client(store), [2], workers=2, timeout_s=10, after_epoch=first)
    thread.join()
    assert (again.incarnation, again.epoch) == (2, 2)
    assert got["server"][0] == 2  # type: ignore[index]


def test_a_slot_nobody_comes_for_is_given_up_and_the_run_goes_on(store, tmp_path: Path) -> None:
    """Under the default worker_failure=fail_fast too: an empty slot is not a failed worker."""
    from easgd.config.algorithm import AlgorithmConfig
    from easgd.engine.members import ElasticServer
    from easgd.roles import make_server_role

    role = make_server_role(AlgorithmConfig("easgd"), torch.zeros(4), num_workers=2)
    listener = membership.SlotListener(
        store, epoch=membership.start_server_epoch(store), timeout_s=5
    )
    server = ElasticServer(
        role, [1, 2], listener, lambda slot, group: None,  # type: ignore[arg-type,return-value]
        ledger_dir=tmp_path, slot_wait_s=0.3, ledger="reply",
    )  # fmt: skip
    server.start()
    for thread in server._threads.values():
        thread.join(timeout=30)
    assert not server.serving()
    assert [server.stats[s].failed for s in (1, 2)] == ["no member came for 0.3 s"] * 2
    assert not server.stop.is_set() and server.server_error is None  # nothing stopped the run
    assert torch.equal(role.center, torch.zeros(4))


@pytest.mark.slow
def test_a_server_that_raises_ends_the_run_and_is_not_started_again(tmp_path: Path) -> None:
    """A server's own error (not a kill) ends an elastic run at once: its keeper does not start
    a new server (which would wait for members that have left), and the members end cleanly."""
    result = run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
         "--max-restarts=0", "-m", "easgd.train", *ELASTIC, f"hydra.run.dir={tmp_path}",
         "fault.raise_rank=0", "fault.raise_at_step=50"],
        timeout=240,
    )  # fmt: skip
    log = result.stderr
    assert result.returncode != 0
    assert "[keeper0] ERROR the child failed (exit code 1) and the run is over; not again" in log
    assert log.count("server start ") == 1  # no second server
    assert "starting a new one" not in log  # and no member was replaced
    for slot in (1, 2, 3):
        assert f"[keeper{slot}] ERROR" not in log  # each member left without an error


@pytest.mark.slow
def test_a_worker_that_comes_late_joins_the_running_server(tmp_path: Path) -> None:
    """The run starts with two of its three workers; the third process is started only once the
    server has applied updates (seen in metrics.csv), and joins the running server: nothing
    restarts, every worker does its whole budget, and the center equals base + every ledger.
    The test plays torchrun's agent: it hosts the shared store and starts the four processes
    with the environment torchrun gives them."""
    import os
    import time

    host = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
    command = [sys.executable, "-m", "easgd.train", *ELASTIC, f"hydra.run.dir={tmp_path}",
               "eval_interval_s=0.5"]  # fmt: skip
    logs = {rank: open(tmp_path / f"rank{rank}.log", "w") for rank in range(4)}  # noqa: SIM115

    def start(rank: int) -> subprocess.Popen[bytes]:
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "4",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(host.port),
               "TORCHELASTIC_USE_AGENT_STORE": "true"}  # fmt: skip
        return subprocess.Popen(command, env=env, stdout=logs[rank], stderr=subprocess.STDOUT)

    processes = [start(rank) for rank in range(3)]
    metrics, deadline = tmp_path / "metrics.csv", time.monotonic() + 180
    try:
        while not (metrics.exists() and _updates_seen(metrics) > 0):
            assert time.monotonic() < deadline, "the server applied no update"
            assert all(p.poll() is None for p in processes), "a process ended before the late one"
            time.sleep(0.1)
        updates_before = _updates_seen(metrics)
        processes.append(start(3))
        codes = [p.wait(timeout=240) for p in processes]
    finally:
        for p in processes:
            p.kill()
        for handle in logs.values():
            handle.close()
    log = "\n".join((tmp_path / f"rank{rank}.log").read_text() for rank in range(4))
    assert codes == [0, 0, 0, 0], log[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert updates_before > 0 and log.count("joined slot 3 as member 1") == 1
    figures = summary["details"]["membership"]
    assert (figures["members_joined"], figures["members_left"]) == (3, 0)
    assert "starting a new one" not in log and summary["restarts"] == 0
    assert summary["worker_steps"] == 3 * 1500  # the late worker did its whole budget too
    assert sum(summary["details"]["redone_steps_by_worker"].values()) == 0
    assert own_ledgers_match(tmp_path / "checkpoints") == 3
    assert membership_gap(tmp_path) < 2e-5  # center == base + the three members' ledgers


def _updates_seen(metrics: Path) -> int:
    """The most server updates any evaluation row of metrics.csv reports (0 before the first)."""
    rows = metrics.read_text().splitlines()[1:]
    return max((int(row.split(",")[2]) for row in rows if row.count(",") >= 5), default=0)


def _wait_for_line(path: Path, text: str, count: int, processes: list, timeout_s: float) -> None:
    """Until ``text`` occurs ``count`` times in the log file ``path`` (an event, not a delay)."""
    import time

    deadline = time.monotonic() + timeout_s
    while path.read_text().count(text) < count:
        assert time.monotonic() < deadline, f"no {count} x {text!r} in {path.name}"
        assert all(p.poll() is None for p in processes), path.read_text()[-3000:]
        time.sleep(0.1)


def _process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc), parents first."""
    tree, index = [pid], 0
    while index < len(tree):
        for task in Path(f"/proc/{tree[index]}/task").glob("*"):
            children = (task / "children").read_text().split()
            tree.extend(int(child) for child in children)
        index += 1
    return tree


@pytest.mark.slow
def test_a_lost_node_takes_only_its_workers_and_a_new_node_joins_the_running_server(
    tmp_path: Path,
) -> None:
    """Two torchrun agents (two "nodes" on this machine): the first runs the server and workers
    1-2 and leaves slots 3-4 open; the second joins them (membership.join). The second agent
    and its whole process group are killed (the node dies); a new agent joins its slots. The
    first node's processes never restart, and the center is base + every member's ledger."""
    import os
    import signal

    port = free_port()
    common = [*ELASTIC, "workers=4", "steps_per_worker=3000", f"hydra.run.dir={tmp_path}"]
    first = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=3",
             "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--max-restarts=0",
             "-m", "easgd.train", *common, "membership.open_slots=2"]  # fmt: skip
    joining = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "-m", "easgd.train", *common, "hydra.output_subdir=null",
               f"membership.join=127.0.0.1:{port}"]  # fmt: skip
    logs = [tmp_path / name for name in ("node0.log", "node1.log", "node1b.log")]

    def start(command: list[str], log: Path) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            command, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
        )

    server_node = start(first, logs[0])
    lost_node = start(joining, logs[1])
    running = [server_node, lost_node]
    try:
        _wait_for_line(logs[1], "as member 1 at step", 2, running, 180)
        for pid in _process_tree(lost_node.pid):  # the node dies: its agent and every process
            os.kill(pid, signal.SIGKILL)  # (torchrun starts each worker in a session of its own)
        lost_node.wait(timeout=30)
        replacement = start(joining, logs[2])
        running.append(replacement)
        codes = [server_node.wait(timeout=240), replacement.wait(timeout=240)]
    finally:
        for process in (server_node, lost_node, *running[2:]):
            if process.poll() is None:
                for pid in _process_tree(process.pid):
                    os.kill(pid, signal.SIGKILL)
    node0, node1b = logs[0].read_text(), logs[2].read_text()
    assert codes == [0, 0], node0[-3000:] + node1b[-3000:]
    assert node0.count("server start ") == 1 and "starting a new one" not in node0
    for slot in (1, 2):
        assert node0.count(f"joined slot {slot} as member 1") == 1
    for slot in (3, 4):  # the new node's workers took the lost node's slots
        assert f"[worker{slot}] INFO joined slot {slot} as member 2" in node1b
    summary = json.loads((tmp_path / "summary.json").read_text())
    figures = summary["details"]["membership"]
    assert (figures["members_joined"], figures["members_left"]) == (6, 2)
    assert summary["worker_steps"] == 4 * 3000 and summary["restarts"] == 0
    redone = summary["details"]["redone_steps_by_worker"]
    assert redone["1"] == redone["2"] == 0  # the first node's workers lost nothing
    assert membership_gap(tmp_path) < 2e-5


def test_joining_keys_are_checked_before_any_process_starts() -> None:
    with pytest.raises(ValueError, match="give HOST:PORT"):
        validate({"membership": {"join": "node0"}})
    with pytest.raises(ValueError, match="not fixed"):
        validate({"membership": {"mode": "fixed", "open_slots": 1}})
    with pytest.raises(ValueError, match="set open_slots=0 here"):
        validate({"membership": {"join": "node0:29400", "open_slots": 1}})
    with pytest.raises(ValueError, match="open_slots=5 is more than workers=4"):
        validate({"workers": 4, "membership": {"open_slots": 5}})
    assert membership_mode(validate({"membership": {"join": "node0:29400"}}), {}) == "elastic"


def test_a_kept_child_dies_with_its_keeper(tmp_path: Path) -> None:
    """kill -9 of a keeper takes its child too (no orphan holding the slot)."""
    import os
    import signal
    import time

    pid_file = tmp_path / "child.pid"
    script = (
        "import multiprocessing as mp, os, time, sys\n"
        "from easgd.topologies.keeper import die_with_keeper\n"
        "def child(keeper, path):\n"
        "    die_with_keeper(keeper)\n"
        "    open(path, 'w').write(str(os.getpid()))\n"
        "    time.sleep(600)\n"
        "if __name__ == '__main__':\n"
        "    mp.get_context('spawn').Process(target=child, args=(os.getpid(), sys.argv[1])).start()\n"
        "    time.sleep(600)\n"
    )
    (tmp_path / "keeper.py").write_text(script)  # spawn pickles the child's function by module
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    keeper = subprocess.Popen([sys.executable, str(tmp_path / "keeper.py"), str(pid_file)], env=env)
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline and keeper.poll() is None
            time.sleep(0.05)
        child = int(pid_file.read_text())
        os.kill(keeper.pid, signal.SIGKILL)
        keeper.wait(timeout=30)
        while Path(f"/proc/{child}").exists() and "Z" not in _state(child):
            assert time.monotonic() < deadline + 60, "the child outlived its keeper"
            time.sleep(0.05)
    finally:
        if keeper.poll() is None:
            keeper.kill()
        if pid_file.exists() and pid_file.read_text() and _state(int(pid_file.read_text())) != "Z":
            os.kill(int(pid_file.read_text()), signal.SIGKILL)  # an orphan left by a failure


def _state(pid: int) -> str:
    """The process state letter from /proc (Z: a zombie, already dead)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return "Z"
