"""Run folders: their names, the ``runs/latest`` link, ``resume=``, and what a folder holds.

A fresh run gets a folder of its own, ``runs/<date>_<time>_<algorithm>_<4 hex>``, that no other run
shares: two runs started in the same second differ in their random suffix. The ranks of
one torchrun job must agree on the folder without talking, so under ``torchrun --standalone``
(whose rendezvous id is a random UUID) the time is the torchrun agent's start time, read from
``/proc`` (the same for every local rank and across the job's restarts), and the suffix comes from
the rendezvous id. A rendezvous id chosen by the user (``--rdzv-id``, a multi-node or SLURM job)
names the folder as it is, ``runs/<id>``, so a requeued job with the same id finds its folder.

``resume=latest`` reuses the folder ``runs/latest`` points to, ``resume=<folder>`` that folder.
A folder whose ``summary.json`` says the run ended (any stop reason but ``interrupted``) is never
written into again: :func:`check_run_dir` refuses it before anything is written.
"""

from __future__ import annotations

import json
import os
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RUNS = Path("runs")
"""Where fresh run folders go (relative to the working directory)."""
LATEST = "latest"
"""The link in :data:`RUNS` to the newest run's folder."""
SIGNATURE_FILE = "run.json"
"""What a run folder's run must match to be resumed: algorithm, model, workers, topology."""
INTERRUPTED = "interrupted"
"""The stop reason of a run ended by SIGINT/SIGTERM: its folder can be resumed."""


def _agent_started() -> float | None:
    """When this process's parent (the torchrun agent) started, in seconds since the epoch."""
    try:
        stat = Path(f"/proc/{os.getppid()}/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])
        boot = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime")
        )
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def _launcher_run_id() -> str | None:
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    return run_id if run_id and run_id != "none" else None


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


def fresh_name(algorithm: str, *, when: float | None = None, suffix: str | None = None) -> str:
    """``<date>_<time>_<algorithm>_<suffix>`` (a random 4-hex suffix unless given)."""
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(when))
    return f"{stamp}_{algorithm}_{suffix or secrets.token_hex(2)}"


def run_folder_name(algorithm: str) -> str:
    """This process's fresh run folder under :data:`RUNS` (see the module docstring)."""
    run_id = _launcher_run_id()
    if run_id is None:
        return fresh_name(algorithm)
    if not _is_uuid(run_id):
        return run_id
    return fresh_name(algorithm, when=_agent_started(), suffix=uuid.UUID(run_id).hex[:4])


def resolve_resume(resume: str) -> Path | None:
    """The folder ``resume`` names (None for ``none``); ValueError naming the fix if there is none."""
    if resume in ("none", "", "null"):
        return None
    if resume == LATEST:
        link = RUNS / LATEST
        if not link.exists():
            raise ValueError(
                f"resume=latest: there is no {link} (no run has started from this folder); "
                "start a run first, or pass resume=<run folder>"
            )
        return Path(os.path.realpath(link))
    folder = Path(resume)
    if not folder.is_dir():
        raise ValueError(
            f"resume={resume}: no such run folder; pass resume=latest or an existing runs/<name>"
        )
    return folder


def run_dir_for(resume: str, algorithm: str) -> str:
    """Hydra's ``hydra.run.dir``: the resumed folder, or a fresh one (the ``easgd_run_dir``
    resolver; an unresolvable ``resume`` gives a fresh name and :func:`check_run_dir` refuses)."""
    try:
        folder = resolve_resume(resume)
    except ValueError:
        folder = None
    return str(folder) if folder is not None else str(RUNS / run_folder_name(algorithm))


@dataclass(frozen=True)
class FolderState:
    """What a run folder holds already."""

    summary: dict[str, Any] | None
    """Its summary.json (None: the run never ended)."""
    signature: dict[str, Any] | None
    """Its run.json (None: no run started there)."""

    @classmethod
    def read(cls, folder: Path) -> FolderState:
        """Read ``folder`` (missing or unreadable files count as absent)."""
        return cls(_read_json(folder / "summary.json"), _read_json(folder / SIGNATURE_FILE))

    @property
    def interrupted(self) -> bool:
        """The run there was ended by SIGINT/SIGTERM (its summary says so): it can be resumed."""
        return self.summary is not None and self.summary.get("stop_reason") == INTERRUPTED

    @property
    def finished(self) -> bool:
        """The run there ended (and was not interrupted)."""
        return self.summary is not None and not self.interrupted


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def signature_of(cfg: Any) -> dict[str, Any]:
    """What a resumed run must keep: algorithm, model, workers, topology, shards (of ``cfg``)."""
    return {
        "algorithm": cfg.algorithm.name,
        "model": cfg.model.name,
        "model_target": cfg.model.target,
        "workers": cfg.workers,
        "topology": cfg.topology,
        "shards": cfg.server.shards,
    }


def check_run_dir(folder: Path, cfg: Any, *, restart: bool) -> FolderState:
    """Refuse (ValueError) a folder holding a finished run, or a run of another kind; the folder's
    state otherwise. ``restart``: a torchrun restart of this job (a finished run is then no error
    for :func:`check_run_dir`; the caller ends at once)."""
    state = FolderState.read(folder)
    if state.finished and not restart:
        reason = state.summary.get("stop_reason") if state.summary else None
        raise ValueError(
            f"{folder} holds a finished run (summary.json, stop_reason={reason}); a finished run "
            "is never overwritten: leave out hydra.run.dir/resume to start a fresh run folder"
        )
    if state.signature is not None:
        mine = signature_of(cfg)
        differ = [k for k in mine if k in state.signature and state.signature[k] != mine[k]]
        if differ:
            was = ", ".join(f"{k}={state.signature[k]}" for k in differ)
            now = ", ".join(f"{k}={mine[k]}" for k in differ)
            raise ValueError(
                f"cannot resume {folder}: it holds a run with {was}, this config has {now}; "
                "resume with the same settings, or start a fresh run (resume=none)"
            )
    return state


def point_latest(folder: Path) -> None:
    """Make ``runs/latest`` point to ``folder`` (atomically; a no-op where links are not allowed)."""
    link = RUNS / LATEST
    if folder.resolve().parent != RUNS.resolve():
        return  # only folders under runs/ are "the latest run"
    tmp = RUNS / f".latest-{secrets.token_hex(4)}"
    try:
        tmp.symlink_to(folder.name, target_is_directory=True)
        os.replace(tmp, link)
    except OSError:
        tmp.unlink(missing_ok=True)


def record_start(folder: Path, cfg: Any, config_yaml: str, overrides: list[str]) -> bool:
    """Mark ``folder`` as this run's (once, by the process that owns the run's record): run.json,
    ``.hydra/config.yaml`` and ``.hydra/overrides.yaml`` if the folder has none yet (a resumed
    run keeps the first ones), and ``runs/latest``. True if a run had started there before."""
    folder.mkdir(parents=True, exist_ok=True)
    signature = folder / SIGNATURE_FILE
    resumed = signature.exists()
    if not resumed:
        signature.write_text(json.dumps(signature_of(cfg), indent=2, sort_keys=True) + "\n")
    hydra = folder / ".hydra"
    if not (hydra / "overrides.yaml").exists():
        hydra.mkdir(exist_ok=True)
        (hydra / "config.yaml").write_text(config_yaml)
        (hydra / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    point_latest(folder)
    return resumed


def remove_if_empty(folder: Path) -> None:
    """Remove the folder Hydra created for a run that was refused (only if nothing is in it)."""
    for empty in (folder, folder.parent):  # and runs/ if this run was to be its first
        try:
            empty.rmdir()
        except OSError:
            return


def resume_command(argv: list[str], folder: Path, *, torchrun_nproc: int | None) -> str:
    """The command that resumes the run in ``folder``: this one's overrides plus ``resume=``."""
    overrides = [a for a in argv if not a.startswith(("resume=", "hydra.run.dir="))]
    head = (
        f"torchrun --standalone --nproc_per_node={torchrun_nproc} -m easgd.train"
        if torchrun_nproc is not None
        else "python -m easgd.train"
    )
    return " ".join([head, *overrides, f"resume={folder}"])
