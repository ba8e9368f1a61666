"""Registers the typed schemas in Hydra's ConfigStore and the ``easgd_run_id`` resolver."""

from __future__ import annotations

import os
import time

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from easgd.config.schema import CostConfig, TrainConfig


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
