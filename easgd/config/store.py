"""Registers the typed schemas in Hydra's ConfigStore and the run-folder resolvers
(``easgd_run_dir``, ``easgd_token``), and finds the YAML config groups (:func:`config_dir`)."""

from __future__ import annotations

import secrets
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from easgd.config.rundir import run_dir_for
from easgd.config.schema import TrainConfig

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


def token() -> str:
    """A random 4-hex suffix (cached per config: one sweep folder for every job of a sweep)."""
    return secrets.token_hex(2)


def register() -> None:
    """Make ``base_config`` and the resolvers available to Hydra (idempotent)."""
    store = ConfigStore.instance()
    store.store(name="base_config", node=TrainConfig)
    if not OmegaConf.has_resolver("easgd_run_dir"):
        OmegaConf.register_new_resolver("easgd_run_dir", run_dir_for, use_cache=True)
    if not OmegaConf.has_resolver("easgd_token"):
        OmegaConf.register_new_resolver("easgd_token", token, use_cache=True)
