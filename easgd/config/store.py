"""Registers the typed schemas in Hydra's ConfigStore and the ``easgd_run_id`` resolver, and finds
the YAML config groups (:func:`config_dir`)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from easgd.config.schema import CostConfig, TrainConfig

PACKAGE = Path(__file__).resolve().parents[1]
"""The ``easgd`` package folder."""


def config_dir() -> Path:
    """The folder of ``config.yaml`` and the config groups that ``easgd.train`` composes.

    A wheel ships the repository's top-level ``configs/`` inside the package as ``easgd/configs/``
    (``setup.py``); a source tree or an editable install has only the top-level folder, next to the
    package. The packaged copy is looked for first, so an installed wheel never reads some other
    ``configs/`` folder that happens to sit next to it in site-packages.
    """
    packaged = PACKAGE / "configs"
    return packaged if (packaged / "config.yaml").is_file() else PACKAGE.parent / "configs"


def run_id() -> str:
    """The run directory's name: torchrun's rendezvous id (the same on every rank and across
    restarts of one job), or a timestamp for a process that no launcher started."""
    launched = os.environ.get("TORCHELASTIC_RUN_ID")
    if launched and launched != "none":
        return launched
    return time.strftime("%Y-%m-%d_%H-%M-%S")


def register() -> None:
    """Make ``base_config`` and the resolver available to Hydra (idempotent)."""
    store = ConfigStore.instance()
    store.store(name="base_config", node=TrainConfig)
    store.store(group="cost", name="base_cost", node=CostConfig)
    if not OmegaConf.has_resolver("easgd_run_id"):
        OmegaConf.register_new_resolver("easgd_run_id", run_id)
