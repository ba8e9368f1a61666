"""Train with EASGD or a baseline: the Hydra entry point.

# one node, 4 workers + the server (rank 0), CPU:
torchrun --standalone --nproc_per_node=5 -m easgd.train
# the same without torchrun (the processes are started through torch's elastic launch API):
python -m easgd.train workers=4
# stop it (Ctrl-C or SIGTERM: a final snapshot, then the command that resumes), and resume:
python -m easgd.train resume=latest
# a sweep, every combination a real distributed run, a table at the sweep's root:
python -m easgd.train -m algorithm=eamsgd,downpour comm.period=1,4
# the same on the simulator's virtual clock with communication costs (one process per run):
python -m easgd.train -m mode=simulate cost=ethernet_1g algorithm=eamsgd,downpour comm.period=1,4,16
# the groups and their options:
python -m easgd.train --help
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from easgd.comm.groups import DistEnv, LaunchError, under_launcher
from easgd.config.rundir import (
    INTERRUPTED,
    FolderState,
    check_run_dir,
    record_start,
    remove_if_empty,
    resolve_resume,
    resume_command,
)
from easgd.config.schema import TrainConfig, validate
from easgd.config.store import config_dir, register
from easgd.parts.preflight import preflight
from easgd.topologies.launch import launch

register()
SWEEP_UNDER_TORCHRUN = (
    "a sweep (-m) cannot run under torchrun: torchrun starts the processes of one run; run the "
    "sweep without torchrun (python -m easgd.train -m ...), which launches every run itself"
)


def check_launch(config: TrainConfig, *, sweep: bool) -> None:
    """What no run folder can fix: a sweep under torchrun, ``resume=`` in a sweep or unresolvable."""
    if sweep and under_launcher():
        raise ValueError(SWEEP_UNDER_TORCHRUN)
    if sweep and config.resume != "none":
        raise ValueError("resume= applies to one run, not a sweep (-m); resume each run on its own")
    resolve_resume(config.resume)


def train(cfg: DictConfig) -> dict[str, Any] | None:
    """Check ``cfg`` and its run folder (before any process starts), then run it; returns the
    summary where the run's record is kept (rank 0). ``mode=simulate`` runs it in this process on
    the simulator's virtual clock instead."""
    hydra_cfg = HydraConfig.get()
    folder = Path(hydra_cfg.runtime.output_dir)
    config = validate(cfg)
    check_launch(config, sweep=hydra_cfg.mode == RunMode.MULTIRUN)
    env = DistEnv.from_environ()
    state = check_run_dir(folder, config, restart=env.restart_count > 0)
    if state.finished:  # a torchrun restart after the run had ended: nothing left to do
        print(f"easgd: the run in {folder} has finished already", file=sys.stderr)
        return state.summary if env.rank == 0 else None
    preflight(config)
    config.run_dir = str(folder)
    if env.rank == 0 and record_start(folder, config, OmegaConf.to_yaml(cfg), _overrides()):
        print(f"easgd: resuming the run in {folder}", file=sys.stderr, flush=True)
    if config.mode == "simulate":
        from easgd.topologies.simulate import run_simulated

        return run_simulated(config)
    try:
        summary = launch(config)
    except BaseException as err:  # the launcher's SignalException, KeyboardInterrupt, a failure
        if FolderState.read(folder).interrupted:
            _hint_resume(config, folder)
            signum = int(getattr(err, "sigval", signal.SIGINT))
            raise SystemExit(128 + signum) from None  # the run ended cleanly: no traceback
        raise
    if summary is not None and summary.get("stop_reason") == INTERRUPTED:
        _hint_resume(config, folder)
    return summary


def _overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task)


def _hint_resume(config: TrainConfig, folder: Path) -> None:
    """After an interruption, print the one command that resumes the run."""
    nproc = config.world_size if under_launcher() else None
    where = Path(os.path.relpath(folder)) if folder.is_absolute() else folder
    command = resume_command(_overrides(), where, torchrun_nproc=nproc)
    print(f"easgd: interrupted; resume with:\n  {command}", file=sys.stderr, flush=True)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Hydra wrapper: turns configuration and launch errors into one clear line and exit code 2
    (removing the run folder Hydra made for a refused run, which is still empty)."""
    try:
        summary = train(cfg)
    except (ValueError, LaunchError) as err:
        remove_if_empty(Path(HydraConfig.get().runtime.output_dir))
        print(f"easgd: error: {err}", file=sys.stderr)
        sys.exit(2)
    return None if summary is None else float(summary["test_error"])


def refuse_sweep_under_torchrun(argv: list[str]) -> None:
    """A sweep under torchrun, refused before Hydra makes any folder (one line, exit code 2)."""
    if under_launcher() and any(a in ("-m", "--multirun") for a in argv[1:]):
        if DistEnv.from_environ().rank == 0:
            print(f"easgd: error: {SWEEP_UNDER_TORCHRUN}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    refuse_sweep_under_torchrun(sys.argv)
    main()
