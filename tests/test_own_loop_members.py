"""Own-loop workers that come and go (``api.keep()`` + ``api.join(membership="elastic")``): the
argument checks and the script keeper in process, then real torchrun runs of
tests/own_loop_members.py where a worker, or the server, is killed."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import cast

import pytest
import torch

from easgd.analysis.audit import membership_gap
from easgd.api.keeper import KEEPER_START, ScriptKeeper, keep
from easgd.api.members import SlotMember
from easgd.api.serve import _check
from easgd.api.session import Session, check_membership
from easgd.comm.groups import LaunchError
from tests import own_loop_members
from tests.dist_helpers import own_ledgers_match
from tests.test_own_loop import torchrun_script
from tests.test_train_e2e import ROOT

# -- the arguments ---------------------------------------------------------------------------


def test_bad_membership_values_name_the_argument_and_what_is_allowed() -> None:
    with pytest.raises(ValueError, match=r"api.join\(membership='sometimes'\); allowed: auto, "):
        check_membership("sometimes")
    with pytest.raises(ValueError, match=r"api.keep\(max_respawns=-1\) must be an int >= 0"):
        keep(max_respawns=-1)
    with pytest.raises(ValueError, match=r"api.serve\(slot_wait_s=0\) must be > 0"):
        _check("easgd", "fail_fast", 1.0, slot_wait_s=0)
    with pytest.raises(ValueError, match=r"api.serve\(run_dir=None\) under membership='elastic'"):
        _check("easgd", "fail_fast", 1.0, elastic=True, run_dir=None)


def test_an_elastic_worker_refuses_a_server_with_a_fixed_roster() -> None:
    session = cast(Session, None)  # refused before the session is used
    with pytest.raises(LaunchError, match="the server runs a fixed roster"):
        SlotMember(session, {"algorithm": "easgd"}, numel=4, dtype=torch.float32, compression=None)


def test_auto_membership_is_elastic_exactly_under_the_keeper(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(KEEPER_START, raising=False)
    assert check_membership("auto") == "fixed"  # scripts without api.keep() run as before
    assert check_membership("fixed") == "fixed"
    with pytest.raises(LaunchError, match=r"needs api.keep\(\) as the script's first call"):
        check_membership("elastic")
    monkeypatch.setenv(KEEPER_START, "2")  # a child the keeper started (again)
    assert check_membership("auto") == check_membership("elastic") == "elastic"
    with pytest.raises(LaunchError, match="cannot rejoin a fixed roster"):
        check_membership("fixed")


def test_keep_returns_at_once_in_a_kept_child_and_outside_torchrun(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ScriptKeeper, "run", lambda self: pytest.fail("keep() kept the script"))
    for name in ("TORCHELASTIC_RUN_ID", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    keep()  # no torchrun: nothing to keep
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv(KEEPER_START, "1")
    keep()  # the child: the script goes on


KEPT_SCRIPT = """
import os, signal, sys
from pathlib import Path
start = int(os.environ["EASGD_KEEPER_START"])
Path(os.environ["EASGD_KEEPER_STARTED"]).touch()
with open(sys.argv[1], "a") as log:
    log.write(f"{start} {os.getpid()}\\n")
if start == 1:
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_the_script_keeper_starts_a_killed_script_again(tmp_path: Path) -> None:
    """The keeper's rules on a script: a child killed by a signal is started again (told its
    start number), and a clean end ends the keeper with exit code 0."""
    script, starts = tmp_path / "kept.py", tmp_path / "starts.txt"
    script.write_text(KEPT_SCRIPT)
    keeper = (
        "import sys; from pathlib import Path; from easgd.api.keeper import ScriptKeeper; "
        f"k = ScriptKeeper([sys.executable, {str(script)!r}, {str(starts)!r}], "
        f"Path({str(tmp_path)!r}), max_respawns=3, store_timeout_s=5); sys.exit(k.run())"
    )
    result = subprocess.run(
        [sys.executable, "-c", keeper],
        env={"RANK": "0", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = starts.read_text().split()
    assert lines[0::2] == ["1", "2"] and lines[1] != lines[3]  # two processes, in turn
    assert "[keeper0] WARNING the child ended with signal SIGKILL; starting a new one" in (
        result.stderr
    )


# -- real runs -------------------------------------------------------------------------------

SCRIPT = ROOT / "tests" / "own_loop_members.py"
STEPS = own_loop_members.STEPS


def _run(tmp_path: Path, kill: str, algorithm: str) -> tuple[str, dict, dict[int, dict]]:
    env = {"RUN_DIR": str(tmp_path), "KILL": kill, "ALGORITHM": algorithm}
    result = torchrun_script(SCRIPT, 4, "--max-restarts=0", env=env)
    assert result.returncode == 0, result.stderr[-4000:]  # torchrun restarted nothing
    summary = json.loads((tmp_path / "summary.json").read_text())
    finals = {r: json.loads((tmp_path / f"final-worker{r}.json").read_text()) for r in (1, 2, 3)}
    return result.stderr, summary, finals


def _joined_pid(log: str, slot: int, member: int) -> int:
    found = re.findall(
        rf"\[rank{slot}\] INFO joined slot {slot} as member {member} .*pid (\d+)", log
    )
    assert len(found) == 1, f"slot {slot} member {member} joined {len(found)} times"
    return int(found[0])


ALGORITHMS = ["easgd", "downpour"]  # an elastic reply, and a push counted as it leaves


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_killed_own_loop_worker_is_replaced_and_nothing_else_restarts(
    tmp_path: Path, algorithm: str
) -> None:
    log, summary, finals = _run(tmp_path, "worker", algorithm)
    assert summary["algorithm"] == {"easgd": "eamsgd", "downpour": "downpour"}[algorithm]
    assert log.count("elastic membership, server start 1, pid") == 1
    assert "server start 2" not in log  # one server process all along
    assert log.count("starting a new one") == 1
    assert "[keeper2] WARNING the child ended with signal SIGKILL; starting a new one" in log
    for rank in (1, 3):  # joined once; the process that finished is the one that joined
        assert finals[rank]["pid"] == _joined_pid(log, rank, 1) and finals[rank]["start"] == 1
    replacement = _joined_pid(log, 2, 2)
    assert replacement != _joined_pid(log, 2, 1) and finals[2]["pid"] == replacement
    left = re.findall(r"slot 2: member 1 left at step (\d+)", log)
    kill_at, tau = own_loop_members.KILL_AT, own_loop_members.TAU
    assert left == [str(kill_at - kill_at % tau)]  # the dead worker's last exchange
    assert finals[2]["start"] == 2 and finals[2]["resumed_step"] == int(left[0])
    figures = summary["details"]["membership"]
    assert (figures["members_joined"], figures["members_left"]) == (4, 1)
    assert len(figures["rejoin_s"]) == 1 and figures["rejoin_s"][0] < 60
    redone = summary["details"]["redone_steps_by_worker"]
    assert redone == {"1": 0, "2": kill_at % tau, "3": 0}  # only the dead worker's steps
    assert [finals[r]["steps"] for r in (1, 2, 3)] == [STEPS] * 3
    assert summary["worker_steps"] == 3 * STEPS and summary["restarts"] == 0
    assert own_ledgers_match(tmp_path / "checkpoints") == 3
    assert membership_gap(tmp_path) < 1e-12  # float64 model: center == base + every ledger


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_killed_own_loop_server_comes_back_with_the_exact_center(
    tmp_path: Path, algorithm: str
) -> None:
    log, summary, finals = _run(tmp_path, "server", algorithm)
    assert "[keeper0] WARNING the child ended with signal SIGKILL; starting a new one" in log
    assert log.count("starting a new one") == 1  # the server's keeper only
    assert log.count("elastic membership, server start 2, pid") == 1
    for rank in (1, 2, 3):  # each worker process lived through it, and rejoined
        assert finals[rank]["pid"] == _joined_pid(log, rank, 1) and finals[rank]["start"] == 1
        rejoined = re.findall(
            rf"\[rank{rank}\] INFO rejoined the server \(start 2\) at step (\d+)", log
        )
        hold, tau = own_loop_members.HOLD_AT, own_loop_members.TAU
        assert len(rejoined) == 1 and hold <= int(rejoined[0]) <= hold + tau  # its next exchange
    figures = summary["details"]["membership"]
    assert (figures["members_joined"], figures["members_rejoined"]) == (3, 3)
    assert summary["worker_steps"] == 3 * STEPS and summary["restarts"] == 1
    assert sum(summary["details"]["redone_steps_by_worker"].values()) == 0  # no steps lost
    assert own_ledgers_match(tmp_path / "checkpoints") == 3
    assert membership_gap(tmp_path) < 1e-12  # nothing the dead server had applied was lost
