"""The own-loop API end to end under torchrun: the README's example, examples/, resume, bad input."""

from __future__ import annotations

import ast
import difflib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import own_loop_resume
from tests.summary_shape import assert_summary_shape
from tests.test_train_e2e import ROOT, run

pytestmark = pytest.mark.slow

EXAMPLES = ROOT / "examples"


def torchrun_script(
    script: Path, nproc: int, *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    args += [f"--nproc_per_node={nproc}", *extra, str(script)]
    if env is None:
        return run(args)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return run(args)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_readme_own_loop_example_runs(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- own-loop-example -->\n```python\n(.*?)```", readme, re.S)
    assert match, "the README lost its own-loop example"
    script = tmp_path / "my_train.py"
    script.write_text(match.group(1))
    result = torchrun_script(script, 3, env={"RUN_DIR": str(tmp_path / "run"), "EPOCHS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    found = re.search(r"center weight norm: ([0-9.]+)", result.stdout)
    if found is None:  # the README shows example (a), whose own test checks its figures
        assert match.group(1) == (EXAMPLES / "mnist1d_cnn.py").read_text()
        return
    norm = float(found.group(1))
    # the older example: the workers fit y = x[:, :2], whose weight [I 0] has norm sqrt(2); the
    # center must have moved most of the way there from the initial weights
    torch.manual_seed(0)
    initial = float(torch.nn.Linear(10, 2).weight.norm())
    assert abs(norm - 2**0.5) < 0.5 * abs(initial - 2**0.5)


def test_example_a_trains_a_cnn_from_a_dataloader_and_records_the_run(tmp_path: Path) -> None:
    result = torchrun_script(
        EXAMPLES / "mnist1d_cnn.py", 3, env={"RUN_DIR": str(tmp_path), "EPOCHS": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert_summary_shape(summary, topology="own_loop")
    assert summary["algorithm"] == "eamsgd"  # serve's default rule, Nesterov-momentum workers
    batches = -(-4000 // 64)  # one epoch of MNIST-1D's 4,000 training sequences per worker
    assert summary["worker_steps"] == 2 * batches
    assert summary["exchanges"] == 2 * len(range(0, batches, 4))  # t = 0, 4, ... on each worker
    assert summary["stop_reason"] == "steps" and summary["failed_workers"] == {}
    rows = (tmp_path / "metrics.csv").read_text().splitlines()[1:]
    first, last = (float(r.split(",")[-1]) for r in (rows[0], rows[-1]))
    assert first > 0.8 and last < 0.8 and last == pytest.approx(summary["test_error"])
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="mixed precision example needs a GPU")
def test_example_b_trains_in_mixed_precision_on_gpu(tmp_path: Path) -> None:
    result = torchrun_script(
        EXAMPLES / "mnist1d_amp.py", 3, env={"RUN_DIR": str(tmp_path), "EPOCHS": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert_summary_shape(summary, topology="own_loop")
    steps = [int(s) for s in re.findall(r"local steps: (\d+)", result.stdout)]
    assert len(steps) == 2 and summary["worker_steps"] == sum(steps)  # skipped steps are not steps
    assert summary["test_error"] < 0.8


def adoption_diff() -> tuple[list[str], list[str]]:
    """Code lines added and removed from the plain script to example (a) (docstrings aside)."""

    def code(path: Path) -> list[str]:
        text = path.read_text()
        return text[text.index('"""', 3) + 3 :].splitlines()

    diff = difflib.unified_diff(
        code(EXAMPLES / "mnist1d_cnn_plain.py"), code(EXAMPLES / "mnist1d_cnn.py"), lineterm="", n=0
    )
    lines = [d for d in diff if not d.startswith(("---", "+++", "@@"))]
    return [d[1:] for d in lines if d.startswith("+")], [d[1:] for d in lines if d.startswith("-")]


def test_adopting_easgd_adds_the_lines_the_docs_count_and_changes_none() -> None:
    added, removed = adoption_diff()
    assert removed == []
    docs = (ROOT / "docs" / "own_loop.md").read_text()
    claim = re.search(r"adds (\d+) lines\s+\((\d+) statements\)", docs)
    assert claim, "docs/own_loop.md lost its line count"
    statements = statement_count(EXAMPLES / "mnist1d_cnn.py") - statement_count(
        EXAMPLES / "mnist1d_cnn_plain.py"
    )
    assert (len(added), statements) == (int(claim.group(1)), int(claim.group(2)))


def statement_count(path: Path) -> int:
    return sum(isinstance(node, ast.stmt) for node in ast.walk(ast.parse(path.read_text())))


def local_updates(steps: int, gradient: torch.Tensor) -> torch.Tensor:
    """The sum of torch SGD's updates of x after ``steps`` steps on a constant gradient, from a
    zero momentum buffer: b_k = momentum b_(k-1) + g, x moves by -lr b_k (heavy ball, and
    Nesterov's x = y - delta v as well)."""
    lr, momentum = own_loop_resume.LR, own_loop_resume.MOMENTUM
    total = sum((1 - momentum**k) / (1 - momentum) for k in range(1, steps + 1))
    return -lr * total * gradient


@pytest.mark.parametrize(
    "mode", [{"OVERLAP": "0", "NESTEROV": "1"}, {"OVERLAP": "1", "NESTEROV": "0"}], ids=str
)
def test_own_loop_snapshots_are_a_consistent_cut_across_a_kill_and_restart(
    tmp_path: Path, mode: dict[str, str]
) -> None:
    result = torchrun_script(
        ROOT / "tests" / "own_loop_resume.py",
        3,
        "--max-restarts=1",
        env={"RUN_DIR": str(tmp_path), **mode},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert_summary_shape(summary, topology="own_loop")
    assert summary["restarts"] == 1 and summary["details"]["resumed_snapshot"] >= 1
    assert summary["failed_workers"] == {}
    resumed = {
        int(r): int(s) for r, s in re.findall(r"worker (\d) resumed at step (\d+)", result.stdout)
    }
    # the killed worker resumed from its part of the committed snapshot, not from step 0, and
    # told the server so in its HELLO
    assert resumed[1] > 0 and summary["resumed_worker_steps"] == {"1": resumed[1], "2": resumed[2]}
    finals = {r: json.loads((tmp_path / f"final-worker{r}.json").read_text()) for r in (1, 2)}
    assert summary["worker_steps"] == sum(f["steps"] for f in finals.values())
    # elastic moves are equal and opposite on a worker and the center: center + sum x_i moves
    # only by the workers' own optimizer steps, whatever was killed and redone
    x0 = torch.tensor(json.loads((tmp_path / "initial.json").read_text()), dtype=torch.float64)
    center = torch.tensor(
        json.loads((tmp_path / "final-center.json").read_text()), dtype=torch.float64
    )
    total = center + sum(torch.tensor(f["x"], dtype=torch.float64) for f in finals.values())
    expected = 3 * x0 + sum(
        local_updates(f["steps"], own_loop_resume.gradient_of(r)) for r, f in finals.items()
    )
    assert torch.allclose(total, expected, rtol=0, atol=1e-9)
    assert not torch.allclose(center, x0, rtol=0, atol=1e-3)  # the exchanges moved the center


MISMATCH = """
import torch
from torch import nn
from easgd import api

session = api.join()
model = nn.Linear(8, 2 if session.env.rank != 2 else 3)  # rank 2 builds another model
if session.is_server:
    api.serve(model, session)
else:
    api.ElasticOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), session).close()
"""


def test_a_model_that_differs_between_ranks_is_one_clear_error(tmp_path: Path) -> None:
    script = tmp_path / "mismatch.py"
    script.write_text(MISMATCH)
    result = torchrun_script(script, 3)
    assert result.returncode != 0
    assert "this worker's model has 27 trainable parameters but the server's has 18" in (
        result.stderr
    )
    assert "build the same model" in result.stderr


BATCHNORM = """
import torch
from torch import nn
from torch.optim.swa_utils import update_bn
from easgd import api

session = api.join()
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
batches = [torch.randn(64, 4, generator=torch.Generator().manual_seed(s)) for s in range(3)]

def evaluate(m):
    update_bn(batches, m)  # the center's own BatchNorm statistics, as for any averaged weights
    return {"test_loss": 0.0, "test_error": 0.0}

if session.is_server:
    api.serve(model, session, evaluate=evaluate, eval_interval_s=0.05)
    with torch.no_grad():
        features = model[0](torch.cat(batches))
    gap = (model[1].running_mean - features.mean(0)).abs().max().item()
    print(f"buffer gap: {gap:.3g}")
else:
    optimizer = api.ElasticOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), session)
    for step in range(40):
        optimizer.zero_grad()
        model(torch.randn(16, 4) * 3 + 1).pow(2).mean().backward()
        optimizer.step()
    optimizer.close()
session.close()
"""


def test_served_batchnorm_statistics_are_recomputed_for_the_center(tmp_path: Path) -> None:
    script = tmp_path / "batchnorm.py"
    script.write_text(BATCHNORM)
    result = torchrun_script(script, 3)
    assert result.returncode == 0, result.stderr[-3000:]
    gap = float(re.search(r"buffer gap: (\S+)", result.stdout).group(1))  # type: ignore[union-attr]
    assert gap < 1e-5


def test_the_readme_text_in_the_docs_shows_example_a_verbatim() -> None:
    docs = (ROOT / "docs" / "own_loop.md").read_text()
    match = re.search(r"<!-- own-loop-example -->\n```python\n(.*?)```", docs, re.S)
    assert match, "docs/own_loop.md lost the README's own-loop example"
    assert match.group(1) == (EXAMPLES / "mnist1d_cnn.py").read_text()
