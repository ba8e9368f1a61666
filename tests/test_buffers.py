"""Models with buffers: the center is evaluated with BatchNorm statistics of its own weights."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import vector_to_parameters
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader, TensorDataset

from easgd.config.schema import DataConfig
from easgd.flat import FlatModel
from easgd.parts.build import build_split
from easgd.recovery.checkpoint import Checkpointer
from easgd.recovery.snapshot import SnapshotLog
from easgd.topologies.server import evaluate_center
from tests.bn_models import bn_mlp


def reference_error(point: torch.Tensor, split) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """The same weights evaluated the textbook way: torch's own update_bn, then eval mode."""
    torch.manual_seed(0)
    model = bn_mlp(split.input_shape, split.num_classes)
    vector_to_parameters(point, model.parameters())
    loader = DataLoader(TensorDataset(split.train_x[:4096]), batch_size=512)
    update_bn(loader, model)
    model.eval()
    with torch.no_grad():
        logits = model(split.test_x)
    loss = float(F.cross_entropy(logits, split.test_y))
    return loss, float((logits.argmax(1) != split.test_y).float().mean())


def trained_point(split) -> torch.Tensor:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    flat = FlatModel(bn_mlp(split.input_shape, split.num_classes))
    point = flat.initial_point()
    generator = torch.Generator().manual_seed(1)
    for _ in range(150):
        index = torch.randint(len(split.train_y), (64,), generator=generator)
        _, grad = flat.loss_and_grad(point, split.train_x[index], split.train_y[index])
        point = point - 0.1 * grad
    return point


def test_center_is_evaluated_with_statistics_of_its_own_weights() -> None:
    split = build_split(DataConfig())
    point = trained_point(split)
    torch.manual_seed(0)
    server_side = FlatModel(bn_mlp(split.input_shape, split.num_classes))  # fresh: init stats
    metrics = evaluate_center(server_side, split, point)
    loss, error = reference_error(point, split)
    assert metrics["test_error"] == pytest.approx(error, abs=1e-6)
    assert metrics["test_loss"] == pytest.approx(loss, rel=1e-5)
    # what the server did before: the initial running statistics give another answer
    torch.manual_seed(0)
    stale = FlatModel(bn_mlp(split.input_shape, split.num_classes)).evaluate(
        point, split.test_x, split.test_y
    )
    assert abs(stale["test_loss"] - loss) > 0.05


@pytest.mark.slow
def test_torchrun_center_error_matches_the_same_weights_evaluated_correctly(tmp_path: Path) -> None:
    from tests.test_train_e2e import run

    result = run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3",
         "-m", "easgd.train", "workers=2", "steps_per_worker=200", "progress=false",
         "tensorboard=false", "model.name=custom", "model.target=tests.bn_models.bn_mlp",
         f"hydra.run.dir={tmp_path}"],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    number = SnapshotLog(tmp_path / "checkpoints").committed()[-1]
    state = Checkpointer(tmp_path / "checkpoints", "server").load(number)
    assert state is not None
    _, error = reference_error(state["role"]["center"], build_split(DataConfig()))
    assert summary["test_error"] == pytest.approx(error, abs=1e-6)
    assert summary["test_error"] < 0.15
