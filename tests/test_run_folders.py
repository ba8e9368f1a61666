"""Run folders and pre-launch checks, in-process: names, resume=, refusals (issue: a user's first hour).

The real runs (concurrent launches, SIGTERM and resume, refusals that write nothing) are in
tests/test_first_hour.py.
"""

from __future__ import annotations

import json
import os
import re
import struct
import uuid
from pathlib import Path

import pytest
import torch
from torch import nn

from easgd.config import rundir
from easgd.config.rundir import (
    FolderState,
    check_run_dir,
    fresh_name,
    record_start,
    resolve_resume,
    resume_command,
    run_folder_name,
)
from easgd.parts import preflight
from easgd.parts.runlog import RunLog
from tests.test_configs import composed

NAME = re.compile(
    r"^\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}_(?P<algorithm>\w+?)_(?P<suffix>[0-9a-f]{4})$"
)


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for key in ("TORCHELASTIC_RUN_ID", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    return tmp_path


def test_fresh_names_carry_date_time_algorithm_and_a_random_suffix(in_tmp: Path) -> None:
    when = 1_764_000_000.0  # one fixed second: only the suffix can tell the runs apart
    names = {fresh_name("downpour", when=when) for _ in range(200)}
    assert len(names) >= 195  # 65,536 suffixes: 200 draws repeat ~0.3 names on average
    for name in names:
        match = NAME.match(name)
        assert match and match["algorithm"] == "downpour", name
    stamp = {name.split("_downpour_")[0] for name in names}
    assert len(stamp) == 1  # the same second for all of them


def test_torchrun_ranks_agree_on_the_folder_and_a_chosen_id_names_it(
    in_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id = str(uuid.uuid4())  # what torchrun --standalone draws
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", run_id)
    first, second = run_folder_name("eamsgd"), run_folder_name("eamsgd")
    assert first == second  # every rank (same parent agent) computes the same name
    match = NAME.match(first)
    assert match and match["suffix"] == uuid.UUID(run_id).hex[:4]
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "slurm-4711")  # --rdzv-id chosen by the user
    assert run_folder_name("eamsgd") == "slurm-4711"


def test_resume_latest_follows_the_link_record_start_writes(in_tmp: Path) -> None:
    cfg = composed("algorithm=downpour")
    with pytest.raises(ValueError, match="resume=latest: there is no runs/latest"):
        resolve_resume("latest")
    first, second = Path("runs") / "a", Path("runs") / "b"
    assert record_start(first, cfg, "x: 1\n", ["algorithm=downpour"]) is False
    assert record_start(second, cfg, "x: 2\n", []) is False
    assert resolve_resume("latest") == second.resolve()
    assert record_start(first, cfg, "x: 3\n", ["resume=runs/a"]) is True  # a resumed run
    assert resolve_resume("latest") == first.resolve()
    # the resumed run keeps the first run's config and overrides
    assert (first / ".hydra" / "config.yaml").read_text() == "x: 1\n"
    assert (first / ".hydra" / "overrides.yaml").read_text() == "- algorithm=downpour\n"
    assert json.loads((first / "run.json").read_text())["algorithm"] == "downpour"
    assert resolve_resume("none") is None
    with pytest.raises(ValueError, match="resume=runs/nosuch: no such run folder"):
        resolve_resume("runs/nosuch")


def _summary(folder: Path, reason: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps({"stop_reason": reason}))


@pytest.mark.parametrize("reason", ["steps", "target_test_error", "max_wall_s", "worker_failure"])
def test_a_finished_run_is_refused_and_an_interrupted_one_is_not(in_tmp: Path, reason: str) -> None:
    cfg = composed()
    _summary(in_tmp / "done", reason)
    with pytest.raises(ValueError, match=f"holds a finished run .*stop_reason={reason}"):
        check_run_dir(in_tmp / "done", cfg, restart=False)
    assert check_run_dir(in_tmp / "done", cfg, restart=True).finished  # a restart ends at once
    _summary(in_tmp / "stopped", "interrupted")
    stopped = check_run_dir(in_tmp / "stopped", cfg, restart=False)
    assert stopped.interrupted and not stopped.finished
    empty = FolderState.read(in_tmp / "empty")
    assert empty.summary is None and empty.signature is None
    assert not empty.interrupted and not empty.finished


@pytest.mark.parametrize(
    ("before", "now", "named"),
    [
        (["algorithm=eamsgd"], ["algorithm=downpour"], "algorithm=eamsgd"),
        (["workers=4"], ["workers=3"], "workers=4"),
        (["model=lenet"], ["model=mlp"], "model=lenet"),
        (["server.shards=2", "workers=4"], ["workers=4"], "shards=2"),
    ],
)
def test_resuming_a_run_of_another_kind_is_refused_naming_both(
    in_tmp: Path, before: list[str], now: list[str], named: str
) -> None:
    folder = in_tmp / "runs" / "x"
    record_start(folder, composed(*before), "", before)
    with pytest.raises(ValueError, match=f"cannot resume .*{re.escape(named)}.*this config has"):
        check_run_dir(folder, composed(*now), restart=False)
    check_run_dir(folder, composed(*before), restart=False)  # the same kind: allowed


def test_the_resume_command_repeats_the_overrides_with_the_folder(in_tmp: Path) -> None:
    argv = ["algorithm=downpour", "resume=latest", "hydra.run.dir=x", "seed=3"]
    folder = Path("runs/r")
    assert resume_command(argv, folder, torchrun_nproc=None) == (
        "python -m easgd.train algorithm=downpour seed=3 resume=runs/r"
    )
    assert resume_command(argv, folder, torchrun_nproc=5) == (
        "torchrun --standalone --nproc_per_node=5 -m easgd.train algorithm=downpour seed=3 "
        "resume=runs/r"
    )


def test_a_resumed_metrics_file_goes_on_from_its_last_clock(tmp_path: Path) -> None:
    first = RunLog(tmp_path, tensorboard=False)
    for wall in (0.0, 1.5, 7.25):
        first.evaluation(wall_s=wall, exchanges=1, server_updates=1, worker_steps=2, test_loss=1.0, test_error=0.5)  # fmt: skip
    first.close()
    second = RunLog(tmp_path, tensorboard=False)
    second.evaluation(wall_s=0.5, exchanges=1, server_updates=1, worker_steps=2, test_loss=1.0, test_error=0.5)  # fmt: skip
    second.close()
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("wall_s,") and rows.count(rows[0]) == 1  # one header
    assert [float(r.split(",")[0]) for r in rows[1:]] == [0.0, 1.5, 7.25, 7.75]


# -- pre-launch checks ---------------------------------------------------------------------------
def test_device_cuda_without_cuda_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device=cuda but CUDA is not available here"):
        preflight.check_device(composed("device=cuda"))
    preflight.check_device(composed("device=auto"))


def test_a_period_the_budget_never_reaches_is_refused() -> None:
    with pytest.raises(ValueError, match=r"comm.period=11 > steps_per_worker=10: no worker"):
        preflight.check_period(composed("comm.period=11", "steps_per_worker=10"))
    preflight.check_period(composed("comm.period=10", "steps_per_worker=10"))  # one exchange
    preflight.check_period(composed("algorithm=sgd", "comm.period=11", "steps_per_worker=10"))


def _idx(path: Path, magic: int, dims: tuple[int, ...], payload: bytes) -> None:
    path.write_bytes(struct.pack(">i", magic) + struct.pack(f">{len(dims)}i", *dims) + payload)


def test_data_files_that_do_not_parse_are_refused(tmp_path: Path) -> None:
    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
    names += ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    for name in names:  # the right names and magic numbers, truncated payloads
        images = "images" in name
        _idx(
            tmp_path / name, 2051 if images else 2049, (10, 28, 28) if images else (10,), b"\0" * 7
        )
    cfg = composed("data=mnist", f"data.root={tmp_path}")
    with pytest.raises(
        ValueError, match="train-images-idx3-ubyte declares .* truncated or corrupt"
    ):
        preflight.load_data(cfg)
    cifar = tmp_path / "cifar-10-batches-py"
    cifar.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (cifar / name).write_bytes(b"not a pickle")  # the right names, the wrong contents
    cfg = composed("data=cifar10", f"data.root={tmp_path}")
    with pytest.raises(ValueError, match="data_batch_1 is not a valid CIFAR-10 python batch"):
        preflight.load_data(cfg)


def raising_model(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    raise RuntimeError("the factory is broken")


def three_logits(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(input_shape).prod()), 3))


def test_a_model_factory_that_raises_or_has_the_wrong_shape_is_refused() -> None:
    split = preflight.load_data(composed())
    target = "tests.test_run_folders.raising_model"
    with pytest.raises(
        ValueError, match=r"model.target=.*raising_model: .*RuntimeError: the factory"
    ):
        preflight.check_model(composed("model.name=custom", f"model.target={target}"), split)
    target = "tests.test_run_folders.three_logits"
    with pytest.raises(ValueError, match=r"has shape \(2, 3\), expected \(2, 10\)"):
        preflight.check_model(composed("model.name=custom", f"model.target={target}"), split)
    preflight.check_model(composed(), split)  # the default MLP passes


def test_remove_if_empty_keeps_a_folder_with_anything_in_it(tmp_path: Path) -> None:
    kept, gone = tmp_path / "runs" / "kept", tmp_path / "runs2" / "gone"
    kept.mkdir(parents=True)
    (kept / "summary.json").write_text("{}")
    gone.mkdir(parents=True)
    rundir.remove_if_empty(kept)
    rundir.remove_if_empty(gone)
    assert (kept / "summary.json").exists()
    assert not gone.exists() and not gone.parent.exists()
    assert os.listdir(tmp_path) == ["runs"]
