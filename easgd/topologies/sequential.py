"""The sequential baselines (sgd, msgd, asgd, mvasgd): p = 1, one process, no server.

Its own part is only the loop: one worker role stepping on one minibatch stream. Data, model,
run log, stop rules, evaluation cadence and summary are the shared parts of
:mod:`easgd.parts.assembly`, so the baselines compare like with like with the distributed runs.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from easgd.comm.groups import DistEnv
from easgd.config.schema import TrainConfig
from easgd.flat import FlatModel
from easgd.parts.assembly import RunParts, RunRecord
from easgd.parts.summary import RunFigures, Summary
from easgd.roles import WorkerRole, gradient_step, make_worker_role


class SequentialRun:
    """One sequential baseline: the role, its minibatch stream and the run's record."""

    def __init__(self, parts: RunParts) -> None:
        cfg = parts.cfg
        device = parts.device(0)
        self.parts = parts
        self.flat: FlatModel = parts.flat_model(device)
        self.role: WorkerRole = make_worker_role(
            cfg.algorithm,
            self.flat.initial_point(),
            comm_period=1,
            schedule=cfg.optim.schedule(cfg.steps_per_worker),
            max_grad_norm=cfg.optim.clip_grad_norm,
        )
        self.sampler = parts.sampler(0, num_workers=1, device=device)
        self.test = (parts.split.test_x.to(device), parts.split.test_y.to(device))
        self.train_x = parts.split.train_x[:4096].to(device)  # BatchNorm statistics of the point
        self.record: RunRecord = parts.record(lead=True, total_steps=cfg.steps_per_worker)
        # rank 0, the one process (fault.hang/nan are refused); fires in the job's first start
        restarts = DistEnv.from_environ().restart_count
        self.faults = parts.faults(0, generation=restarts, who="the sequential process")

    def _gradient(self, point: Tensor) -> tuple[float, Tensor]:
        return self.flat.loss_and_grad(point, *self.sampler.sample())

    def evaluate(self) -> dict[str, float]:
        """The evaluated point's test figures (BatchNorm statistics recomputed first)."""
        point = self.role.evaluated()
        self.flat.recompute_running_stats(point, self.train_x)
        return self.flat.evaluate(point, *self.test)

    def run(self) -> dict[str, Any]:
        """Step until the budget is spent or a stop rule fires; write and return the summary."""
        role, record = self.role, self.record
        record.start()
        try:
            while role.step < self.parts.cfg.steps_per_worker:
                if record.cadence.due(record.elapsed()):
                    self._evaluation()
                if record.check_stop():
                    break
                loss = gradient_step(role, self._gradient)
                self.faults.worker_step(role.step, role.params)
                record.runlog.scalar("worker1/train_loss", float(loss), role.step)
                record.progress.advance(1, exchanges=0)
            final = self.evaluate()
        except BaseException:
            record.close()
            raise
        return record.finish(self._summary(final))

    def _evaluation(self) -> None:
        metrics = self.evaluate()
        self.record.evaluated(metrics, exchanges=0, server_updates=0, worker_steps=self.role.step)

    def _summary(self, final: dict[str, float]) -> Summary:
        record, role = self.record, self.role
        record.runlog.evaluation(
            wall_s=record.elapsed(),
            exchanges=0,
            server_updates=0,
            worker_steps=role.step,
            **final,
        )
        train = self.flat.evaluate(
            role.evaluated(), self.parts.split.train_x, self.parts.split.train_y
        )
        figures = RunFigures(
            wall_time_s=record.elapsed(),
            worker_steps=role.step,
            exchanges=0,
            server_updates=0,
            test_loss=final["test_loss"],
            test_error=final["test_error"],
            stop_reason=record.stop_reason,
        )
        return Summary.of_run(
            self.parts.cfg,
            figures,
            topology="sequential",
            num_params=self.flat.num_params,
            details={"train_loss": train["test_loss"], "train_error": train["test_error"]},
        )


def run_sequential(cfg: TrainConfig, parts: RunParts | None = None) -> dict[str, Any]:
    """A sequential baseline (p = 1, no server); returns the summary written to summary.json."""
    return SequentialRun(parts or RunParts.load(cfg)).run()
