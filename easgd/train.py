"""Train with EASGD or a baseline: the Hydra entry point.

# one node, 4 workers + the server (rank 0), CPU:
torchrun --standalone --nproc_per_node=5 -m easgd.train
# the same without torchrun (the processes are started through torch's elastic launch API):
python -m easgd.train workers=4
# a sweep, every combination a real distributed run, a table at the sweep's root:
python -m easgd.train -m algorithm=eamsgd,downpour comm.period=1,4
# the same on the simulator's virtual clock with communication costs (one process per run):
python -m easgd.train -m mode=simulate cost=ethernet_1g algorithm=eamsgd,downpour comm.period=1,4,16
# the groups and their options:
python -m easgd.train --help
"""

from __future__ import annotations

import sys
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from easgd.comm.groups import LaunchError
from easgd.config.schema import validate
from easgd.config.store import config_dir, register
from easgd.parts.preflight import preflight
from easgd.topologies.launch import launch

register()


def train(cfg: DictConfig) -> dict[str, Any] | None:
    """Validate ``cfg`` (before any process starts), then run it; returns the summary on rank 0.

    ``mode=simulate`` runs it in this process on the simulator's virtual clock instead.
    """
    config = validate(cfg)
    preflight(config)
    config.run_dir = HydraConfig.get().runtime.output_dir
    if config.mode == "simulate":
        from easgd.topologies.simulate import run_simulated

        return run_simulated(config)
    return launch(config)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Hydra wrapper: turns configuration and launch errors into one clear line and exit code 2."""
    try:
        summary = train(cfg)
    except (ValueError, LaunchError) as err:
        print(f"easgd: error: {err}", file=sys.stderr)
        sys.exit(2)
    return None if summary is None else float(summary["test_error"])


if __name__ == "__main__":
    main()
