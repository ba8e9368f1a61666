"""Checks run before any process starts, each failing with one line that names the problem and
the fix: the device, a period the step budget never reaches, the dataset (its files are read and
parsed), and the model (built, and run on two test examples to check its output's shape).

Under torchrun every rank runs them before it joins the process group; a self-launched run or a
sweep runs them once in the launching shell.
"""

from __future__ import annotations

import torch

from easgd.config.schema import TrainConfig
from easgd.data.split import Split
from easgd.parts.build import build_model, build_split


def preflight(cfg: TrainConfig) -> None:
    """Raise ValueError naming the first problem found and its fix."""
    check_device(cfg)
    check_period(cfg)
    check_model(cfg, load_data(cfg))


def check_device(cfg: TrainConfig) -> None:
    """``device=cuda`` needs CUDA here."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but CUDA is not available here; use device=cpu or auto")


def check_period(cfg: TrainConfig) -> None:
    """A worker exchanges at t % period == 0 for t >= period: a period beyond the budget means
    that no worker ever exchanges and the center never moves."""
    if cfg.algorithm.spec.uses_server and cfg.comm.period > cfg.steps_per_worker:
        raise ValueError(
            f"comm.period={cfg.comm.period} > steps_per_worker={cfg.steps_per_worker}: no worker "
            "would ever exchange, so the center would not train; lower comm.period or raise "
            "steps_per_worker"
        )


def load_data(cfg: TrainConfig) -> Split:
    """The dataset, read and parsed as every rank will (a file that does not parse fails here)."""
    try:
        return build_split(cfg.data)
    except ValueError:
        raise
    except Exception as err:  # a truncated or corrupt file: the reader's own exception
        where = f" under data.root={cfg.data.root}" if cfg.data.root else ""
        raise ValueError(
            f"data.name={cfg.data.name}: the dataset{where} could not be read "
            f"({type(err).__name__}: {err}); replace the damaged files with the original ones"
        ) from None


def check_model(cfg: TrainConfig, split: Split) -> None:
    """Build the model and run it on two test examples: it must give (2, num_classes) logits."""
    what = (
        f"model.target={cfg.model.target}" if cfg.model.target else f"model.name={cfg.model.name}"
    )
    try:
        model = build_model(cfg.model, split, seed=cfg.seed).eval()
        with torch.no_grad():
            out = model(split.test_x[:2])
    except ValueError:
        raise
    except Exception as err:
        raise ValueError(
            f"{what}: building the model or a forward pass on {split.name} raised "
            f"{type(err).__name__}: {err}; fix the model factory (it is called with input_shape="
            f"{split.input_shape}, num_classes={split.num_classes})"
        ) from None
    want = (min(2, len(split.test_x)), split.num_classes)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"{what}: the model's output on a batch of {want[0]} {split.name} examples has shape "
            f"{got}, expected {want} (one logit per class); fix the model's last layer"
        )
