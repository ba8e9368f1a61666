"""What a run records in its directory: TensorBoard events, a metrics time series, summary.json.

Only the process that evaluates (the server, shard 0, all-reduce rank 0, or the single sequential
process) writes here; the others hold a ``RunLog(None)``, which records nothing.
"""

from __future__ import annotations

import csv
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from easgd.recovery.files import atomic_write

METRIC_FIELDS = ("wall_s", "exchanges", "server_updates", "worker_steps", "test_loss", "test_error")


class RunLog:
    """TensorBoard scalars + ``metrics.csv`` + ``summary.json`` under ``run_dir``. Thread-safe.

    ``run_dir=None``: a log that records nothing (a process that does not own the run's record).
    """

    def __init__(self, run_dir: str | os.PathLike[str] | None, *, tensorboard: bool = True) -> None:
        self.run_dir = None if run_dir is None else Path(run_dir)
        self._lock = threading.Lock()
        self._writer: Any = None
        self._metrics_file: Any = None
        self._metrics: Any = None
        self.wall_offset_s = 0.0
        self.started = time.time()
        if self.run_dir is None:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.run_dir / "tb"))
        new_file = not (self.run_dir / "metrics.csv").exists()
        self.wall_offset_s = 0.0 if new_file else _last_wall_s(self.run_dir / "metrics.csv")
        """A resumed run's clock goes on from the last row of the run before (0 on a fresh run)."""
        self._metrics_file = open(self.run_dir / "metrics.csv", "a", newline="")  # noqa: SIM115
        self._metrics = csv.writer(self._metrics_file)
        if new_file:
            self._metrics.writerow(METRIC_FIELDS)

    @property
    def writes_scalars(self) -> bool:
        """Whether TensorBoard scalars are written (callers can skip computing them if not)."""
        return self._writer is not None

    def scalar(self, tag: str, value: float, step: int, *, walltime: float | None = None) -> None:
        """One TensorBoard scalar."""
        if self._writer is not None:
            with self._lock:
                self._writer.add_scalar(tag, value, step, walltime=walltime)

    def evaluation(
        self,
        *,
        wall_s: float,
        exchanges: int,
        server_updates: int,
        worker_steps: int,
        test_loss: float,
        test_error: float,
    ) -> None:
        """One evaluation of the evaluated variable, against wall time and against exchanges."""
        if self._metrics is None:
            return
        walltime = self.started + wall_s
        wall_s += self.wall_offset_s
        with self._lock:
            self._metrics.writerow(
                [f"{wall_s:.3f}", exchanges, server_updates, worker_steps, test_loss, test_error]
            )
            self._metrics_file.flush()
        self.scalar("center/test_loss", test_loss, exchanges, walltime=walltime)
        self.scalar("center/test_error", test_error, exchanges, walltime=walltime)
        # the same curves indexed by elapsed milliseconds, for plots against wall-clock time
        self.scalar("center_by_time/test_loss", test_loss, int(wall_s * 1000), walltime=walltime)
        self.scalar("center_by_time/test_error", test_error, int(wall_s * 1000), walltime=walltime)

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        """The run's hyperparameters and final metrics (TensorBoard's HParams tab)."""
        if self._writer is None:
            return
        clean = {
            k: (v if isinstance(v, int | float | str | bool) else str(v))
            for k, v in hparams.items()
        }
        with self._lock:
            self._writer.add_hparams(
                clean, {f"hparam/{k}": v for k, v in metrics.items()}, run_name="."
            )

    def summary(self, summary: dict[str, Any]) -> Path | None:
        """Write ``summary.json`` atomically and return its path (None: this log records nothing)."""
        if self.run_dir is None:
            return None
        text = json.dumps(summary, indent=2, sort_keys=True) + "\n"
        return atomic_write(self.run_dir / "summary.json", text)

    def close(self) -> None:
        """Flush and close every file."""
        with self._lock:
            if self._writer is not None:
                self._writer.flush()
                self._writer.close()
                self._writer = None
            if self._metrics_file is not None:
                self._metrics_file.close()


def _last_wall_s(path: Path) -> float:
    """The ``wall_s`` of the last row of ``path`` (0 if it has none)."""
    with open(path, newline="") as file:
        rows = list(csv.reader(file))
    for row in reversed(rows[1:]):
        try:
            return float(row[0])
        except (IndexError, ValueError):
            continue
    return 0.0
