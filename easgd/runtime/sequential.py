"""The sequential baselines (sgd, msgd, asgd, mvasgd): p = 1, one process, no server, through the
same worker role, run log and summary as the distributed algorithms."""

from __future__ import annotations

import logging
import time
from typing import Any

from easgd.comm.groups import DistEnv
from easgd.config.schema import TrainConfig
from easgd.data.sampling import MinibatchSampler
from easgd.data.split import Split
from easgd.flat import FlatModel
from easgd.roles import make_worker_role
from easgd.runtime.components import build_model, device_for
from easgd.runtime.faults import FaultInjector
from easgd.runtime.progress import Progress
from easgd.runtime.runlog import RunLog
from easgd.runtime.server import StopRule
from easgd.runtime.summary import build_summary, finish_run

log = logging.getLogger("easgd")


def run_sequential(cfg: TrainConfig, split: Split) -> dict[str, Any]:
    """A sequential baseline (p = 1, no server) through the same role, log and summary."""
    device = device_for(cfg, 0)
    flat = FlatModel(
        build_model(cfg.model, split, seed=cfg.seed).to(device),
        weight_decay=cfg.algorithm.weight_decay,
    )
    role = make_worker_role(cfg.algorithm, flat.initial_point(), comm_period=1)
    sampler = MinibatchSampler(
        split,
        batch_size=cfg.data.batch_size,
        worker_index=0,
        num_workers=1,
        seed=cfg.seed,
        device=device,
    )
    test_x, test_y = split.test_x.to(device), split.test_y.to(device)
    train_x = split.train_x[:4096].to(device)  # for BatchNorm statistics of the evaluated point
    runlog = RunLog(cfg.run_dir, tensorboard=cfg.tensorboard)
    progress = Progress(cfg.steps_per_worker, enabled=cfg.progress)
    started = time.perf_counter()
    next_eval = 0.0
    stop_reason = "steps"

    def evaluate() -> dict[str, float]:
        flat.recompute_running_stats(role.evaluated(), train_x)
        metrics = flat.evaluate(role.evaluated(), test_x, test_y)
        runlog.evaluation(
            wall_s=time.perf_counter() - started,
            exchanges=0,
            server_updates=0,
            worker_steps=role.step,
            **metrics,
        )
        progress.note(test_error=metrics["test_error"])
        return metrics

    # rank 0, the one process; fault.* fires in the job's first start (hang and nan are refused)
    faults = FaultInjector(
        cfg.fault, 0, generation=DistEnv.from_environ().restart_count, who="the sequential run"
    )
    rule = StopRule(max_wall_s=cfg.max_wall_s, target_test_error=cfg.target_test_error)
    try:
        while role.step < cfg.steps_per_worker:
            now = time.perf_counter() - started
            test_error = None
            if now >= next_eval:
                test_error = evaluate()["test_error"]
                next_eval = now + cfg.eval_interval_s
            reason = rule.reason(elapsed_s=now, test_error=test_error)
            if reason is not None:
                stop_reason = reason
                break
            loss, grad = flat.loss_and_grad(role.gradient_point(), *sampler.sample())
            role.local_step(grad)
            faults.worker_step(role.step, role.params)
            runlog.scalar("worker1/train_loss", loss, role.step)
            progress.advance(1, exchanges=0)
        metrics = evaluate()
        train = flat.evaluate(role.evaluated(), split.train_x, split.train_y)
        progress.close()
        summary = build_summary(
            cfg,
            num_params=flat.num_params,
            wall_time_s=time.perf_counter() - started,
            exchanges=0,
            server_updates=0,
            worker_steps=role.step,
            test_loss=metrics["test_loss"],
            test_error=metrics["test_error"],
            stop_reason=stop_reason,
            extra={"train_loss": train["test_loss"], "train_error": train["test_error"]},
        )
        finish_run(runlog, cfg, summary)
    finally:
        runlog.close()
    log.info(
        "done in %.1f s: test error %.2f%%", summary["wall_time_s"], 100 * summary["test_error"]
    )
    return summary
