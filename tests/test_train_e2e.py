"""End to end: real torchrun (and the self-launcher) running easgd.train, and its bad-input errors."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.summary_shape import assert_summary_shape

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], *, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def torchrun(nproc: int, *overrides: str) -> subprocess.CompletedProcess[str]:
    return run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "easgd.train",
            *overrides,
        ]
    )


def test_torchrun_main_job_shape_writes_summary_metrics_and_tensorboard(tmp_path: Path) -> None:
    result = torchrun(
        3,
        "workers=2",
        "steps_per_worker=300",
        "comm.period=5",
        "eval_interval_s=0.2",
        f"hydra.run.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert_summary_shape(summary, topology="server")
    assert (
        summary["algorithm"] == "eamsgd" and summary["workers"] == 2 and summary["comm_period"] == 5
    )
    assert summary["steps_per_worker"] == 300 and summary["worker_steps"] == 600
    assert summary["exchanges"] == 2 * 300 // 5  # t = 0, 5, ..., 295 on each worker
    assert summary["wall_time_s"] > 0 and summary["stop_reason"] == "steps"
    assert summary["test_error"] < 0.15  # digits after 600 EAMSGD steps (untrained: ~0.9)
    with open(tmp_path / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) >= 2 and float(rows[0]["test_error"]) > float(rows[-1]["test_error"])
    assert int(rows[-1]["exchanges"]) == summary["exchanges"]

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ["center/test_loss", "center/test_error", "center_by_time/test_error"]:
        assert tag in tags
    for rank in (1, 2):
        for name in ["train_loss", "elastic_distance", "exchange_latency_ms", "staleness"]:
            assert f"worker{rank}/{name}" in tags
    assert events.Scalars("center/test_error")[-1].value == pytest.approx(summary["test_error"])
    hparams = events.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(hparams)
    assert b"comm_period" in hparams["_hparams_/session_start_info"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["algorithm.learning_rate=-1"], "algorithm.learning_rate must be a finite number >= 0"),
        (["comm.period=0"], "comm.period must be an integer >= 1"),
        (["comm.backend=nccl"], "comm.backend=nccl needs CUDA GPUs"),
        (["data=mnist"], "data.root must name the folder"),
        (["algorithm=mdownpour", "comm.period=4"], "mdownpour needs comm.period=1"),
    ],
)
def test_bad_config_fails_before_any_process_starts(
    overrides: list[str], message: str, tmp_path: Path
) -> None:
    result = run(
        [sys.executable, "-m", "easgd.train", *overrides, f"hydra.run.dir={tmp_path}"], timeout=60
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "summary.json").exists()


def test_unknown_key_fails_at_composition(tmp_path: Path) -> None:
    result = run(
        [
            sys.executable,
            "-m",
            "easgd.train",
            "algorithm.learning_rat=0.1",
            f"hydra.run.dir={tmp_path}",
        ],
        timeout=60,
    )
    assert result.returncode != 0
    assert "learning_rat" in result.stderr


def test_world_size_mismatch_is_one_clear_error(tmp_path: Path) -> None:
    result = torchrun(3, "workers=4", f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0
    assert "world size is 3 but the config expects 5" in result.stderr
    assert "--nproc_per_node=5" in result.stderr


def test_parameter_count_mismatch_between_ranks_is_reported(tmp_path: Path) -> None:
    result = torchrun(
        3,
        "workers=2",
        "model.name=custom",
        "model.target=tests.rank_models.rank_dependent_mlp",
        "comm.timeout_s=30",
        f"hydra.run.dir={tmp_path}",
    )
    assert result.returncode != 0
    assert "every rank must build the same model" in result.stderr


def test_help_lists_the_config_groups() -> None:
    result = run([sys.executable, "-m", "easgd.train", "--help"], timeout=60)
    assert result.returncode == 0
    for line in [
        "algorithm: adownpour, asgd, diloco, downpour, eamsgd, easgd, localsgd, mdownpour, msgd, mvadownpour, mvasgd, sgd",
        "data: cifar10, digits, mnist, mnist1d, synthetic",
        "model: cifar7, cnn1d, lenet, mlp",
        "cost: cluster_10gbe, cross_datacenter, ethernet_10g, ethernet_1g, gpu8_pcie, infiniband_hdr, "
        "measured, paper_cluster, pcie_node, zero",
        "Rank 0 is the parameter server",
    ]:
        assert line in result.stdout


def test_two_torchrun_agents_with_c10d_rendezvous_form_one_run(tmp_path: Path) -> None:
    # two "nodes" on this machine: the multi-node launch path (launch/run_multinode.sh)
    from tests.dist_helpers import free_port

    port = free_port()
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=2",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=two-nodes",
        "-m", "easgd.train", "workers=3", "steps_per_worker=200", "progress=false", f"hydra.run.dir={tmp_path}",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    nodes = [
        subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [node.communicate(timeout=180) for node in nodes]
    assert all(node.returncode == 0 for node in nodes), (
        outputs[0][1][-2000:] + outputs[1][1][-2000:]
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["workers"] == 3 and summary["worker_steps"] == 600
    assert summary["exchanges"] == 3 * 200 // 10


def test_sequential_baseline_runs_in_one_process_and_stops_on_target(tmp_path: Path) -> None:
    result = run(
        [sys.executable, "-m", "easgd.train", "algorithm=asgd", "steps_per_worker=5000",
         "target_test_error=0.2", "eval_interval_s=0.05", "progress=false", f"hydra.run.dir={tmp_path}"],
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert_summary_shape(summary, topology="sequential")
    assert summary["algorithm"] == "asgd" and summary["workers"] == 1 and summary["exchanges"] == 0
    assert summary["stop_reason"] == "target_test_error" and summary["test_error"] <= 0.2
    assert summary["worker_steps"] < 5000
