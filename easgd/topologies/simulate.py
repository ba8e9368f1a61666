"""``mode=simulate``: any training config run by the simulator on its virtual clock, in one process,
with the outputs of a real run: a log line naming its run directory, summary.json, metrics.csv and
TensorBoard events (the evaluations and the worker tags of :mod:`.simulate_tags`). It writes no
``checkpoints/``: a simulated run is not snapshotted or resumed (it is deterministic: rerun it from
its seed), and ``checkpoint.*`` has no effect in this mode.

The virtual clock counts seconds of the cost profile: a worker's step takes the model's step time
(measured here unless ``cost.step_time_s`` is set), an exchange what :mod:`easgd.sim.cost` charges.
``eval_interval_s`` and ``max_wall_s`` are read on that clock, so a sweep compares methods in
virtual time the way real runs compare in wall time; with neither ``eval_interval_s`` nor
``eval_interval_steps`` set, a run evaluates every 1/50 of its worker steps (a curve of 51
points and the final one)::

    python -m easgd.train mode=simulate data=mnist1d model=cnn1d cost=ethernet_1g
    python -m easgd.train -m mode=simulate algorithm=eamsgd,downpour comm.period=1,4,16
    python -m easgd.train mode=simulate topology=allreduce algorithm=diloco comm.period=50

``topology=allreduce`` runs the synchronous schedule, every round charged as one ring all-reduce
of the model (:func:`easgd.sim.cost.ring_allreduce_time`); the others the asynchronous schedule
with a parameter server.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from easgd.config.algorithm import AlgorithmConfig
from easgd.config.schema import TrainConfig, to_dict
from easgd.parts.assembly import RunParts, eval_every
from easgd.parts.runlog import RunLog
from easgd.parts.summary import RunFigures, Summary
from easgd.roles import gradient_step, make_server_role, make_worker_role
from easgd.roles.links import ServerLink, compression_of
from easgd.sim import ClassifierObjective, SimConfig, SimResult, Simulator
from easgd.sim.cost import ExchangeCost, cached, exchange_cost, measure_gloo_exchange, median_time_s
from easgd.topologies.simulate_tags import WorkerTags

log = logging.getLogger("easgd")

STOP_REASONS = {
    "duration": "max_wall_s",
    "steps": "steps",
    "target_test_error": "target_test_error",
}
"""The simulator's stop reasons in the words of a real run's summary."""


@dataclass(frozen=True)
class CostFigures:
    """A resolved cost profile: physical figures and the charges in steps."""

    profile: str
    step_time_s: float
    latency_s: float
    bandwidth_gbps: float | None
    service_s: float
    charges: ExchangeCost
    charged_params: int
    """Parameters each message is charged for (the profile's, or the simulated model's)."""


def check_simulable(cfg: TrainConfig) -> None:
    """Reject what the simulator does not model, naming the key (before any work)."""
    if cfg.data.sampling != "whole":
        raise ValueError(
            "mode=simulate samples every worker's minibatches from the whole training set; "
            "set data.sampling=whole"
        )
    # fault.* is refused for mode=simulate where every fault is checked (config.schema)
    if cfg.max_update_norm is not None:
        raise ValueError("max_update_norm (the server's guard) is not simulated; set it to null")


def resolve_cost(cfg: TrainConfig, objective: ClassifierObjective) -> CostFigures:
    """The cost profile's figures, measuring (once per machine, cached) what it leaves null.

    The step is the same for every algorithm (gradient + SGD update of the model), so one sweep's
    runs share one time unit; the service time is the algorithm's own server rule.
    """
    cost, uses_server = cfg.cost, cfg.algorithm.uses_server
    # what the messages are charged for: the profile's model, or the simulated one
    numel = objective.flat.num_params if cost.charged_params is None else cost.charged_params
    step_time_s = cost.step_time_s
    if step_time_s is None:
        step_time_s = _measured_step_s(cfg, objective)
    service_s = 0.0 if cost.service_us is None else cost.service_us * 1e-6
    if cost.service_us is None and uses_server and cfg.topology == "server":
        service_s = _measured_service_s(cfg, objective, numel)
    latency_s, bandwidth_gbps = cost.latency_us * 1e-6, cost.bandwidth_gbps
    if cost.measure_network and uses_server:
        network = cached(
            {"what": "gloo_exchange", "num_params": numel},
            lambda: dict(
                zip(("latency_s", "bandwidth_gbps"), measure_gloo_exchange(numel), strict=True)
            ),
        )
        latency_s, bandwidth_gbps = network["latency_s"], network["bandwidth_gbps"]
    # injected delay of the real runtime (comm.latency_ms + mean jitter) adds to the link's latency
    latency_s += (cfg.comm.latency_ms + cfg.comm.jitter_ms / 2) / 1000
    charges = ExchangeCost()
    if uses_server:
        charges = exchange_cost(
            latency_s=latency_s,
            bandwidth_gbps=bandwidth_gbps,
            service_s=service_s,
            num_params=numel,
            step_time_s=step_time_s,
            compression=cfg.comm.compression,
        )
    return CostFigures(cost.name, step_time_s, latency_s, bandwidth_gbps, service_s, charges, numel)


def _measured_step_s(cfg: TrainConfig, objective: ClassifierObjective) -> float:
    """Seconds per local step of this model here (gradient + SGD update), cached per machine."""
    key = {
        "what": "step",
        "model": to_dict(cfg)["model"],
        "data": cfg.data.name,
        "batch_size": cfg.data.batch_size,
        "threads": torch.get_num_threads(),
        "num_params": objective.flat.num_params,
    }
    worker = make_worker_role(
        AlgorithmConfig("sgd", learning_rate=0.0), objective.initial_point(), comm_period=1
    )
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        gradient_step(worker, lambda point: objective.gradient(point, generator))

    return float(cached(key, lambda: {"s": median_time_s(step, repeats=30)})["s"])


def _measured_service_s(cfg: TrainConfig, objective: ClassifierObjective, numel: int) -> float:
    """Seconds the algorithm's server rule takes for one exchange of ``numel`` parameters (the
    model's, or a profile's ``charged_params``: the rule is elementwise, any values do), cached."""
    start = objective.initial_point()
    if numel != start.numel():
        start = torch.zeros(numel, dtype=start.dtype)
    server = make_server_role(cfg.algorithm, start, num_workers=cfg.workers)
    payload = start + 1e-3 if cfg.algorithm.elastic else torch.zeros_like(start)
    comm = cfg.comm
    if comm.compression != "none":  # the server decodes and encodes too
        compression = compression_of(
            cfg.algorithm, comm.compression, comm.error_feedback, start.numel()
        )
        link, wire = ServerLink(compression, start), compression.worker_link(start).send(payload)

    def serve() -> None:
        if comm.compression != "none":
            link.handle(server, 0, wire)
        else:
            server.handle(0, payload)

    family = "elastic" if cfg.algorithm.elastic else cfg.algorithm.name  # the cache key
    key = {"what": "service", "algorithm": family, "num_params": numel}
    if comm.compression != "none":
        key.update(compression=comm.compression, error_feedback=comm.error_feedback)
    return float(cached(key, lambda: {"s": median_time_s(serve, repeats=30)})["s"])


def build_simulation(
    cfg: TrainConfig, parts: RunParts | None = None
) -> tuple[Simulator, CostFigures]:
    """The simulator of ``cfg`` (model, data, algorithm, workers, period, stops) and its costs."""
    check_simulable(cfg)
    parts = parts or RunParts.load(cfg)
    objective = ClassifierObjective(
        parts.model(),
        parts.split,
        batch_size=cfg.data.batch_size,
        weight_decay=cfg.algorithm.weight_decay,
    )
    figures = resolve_cost(cfg, objective)
    unit = figures.step_time_s
    every_s, every_steps = eval_every(cfg)
    synchronous = cfg.topology == "allreduce"  # every rank waits for every other each round
    sim = SimConfig(
        num_workers=cfg.workers if cfg.algorithm.uses_server else 1,
        comm_period=cfg.comm.period if cfg.algorithm.uses_server else 1,
        schedule="synchronous" if synchronous else "asynchronous",
        duration=math.inf if cfg.max_wall_s is None else cfg.max_wall_s / unit,
        slowdown=list(cfg.comm.slowdown) if cfg.algorithm.uses_server and not synchronous else [],
        eval_interval=math.inf if every_s is None else every_s / unit,
        eval_interval_steps=every_steps,
        seed=cfg.seed,
        cost=figures.charges,
        overlap=cfg.comm.overlap,
        steps_per_worker=cfg.steps_per_worker,
        target_test_error=cfg.target_test_error,
        compression=cfg.comm.compression,
        error_feedback=cfg.comm.error_feedback,
        lr_schedule=cfg.optim.schedule(cfg.steps_per_worker),
        max_grad_norm=cfg.optim.clip_grad_norm,
        batched=cfg.sim.batched,
    )
    return Simulator(cfg.algorithm, sim, objective), figures


def run_simulated(cfg: TrainConfig) -> dict[str, Any]:
    """Run ``cfg`` on the virtual clock; write and return the summary (as a real run would)."""
    parts = RunParts.load(cfg)
    simulator, figures = build_simulation(cfg, parts)
    unit = figures.step_time_s
    num_params = simulator.objective.flat.num_params  # type: ignore[attr-defined]
    log.info(
        "%s simulated (cost profile %s) with %d workers, tau=%d, %d parameters; run directory %s",
        cfg.algorithm.name,
        figures.profile,
        simulator.sim.num_workers,
        simulator.sim.comm_period,
        num_params,
        os.path.abspath(cfg.run_dir),
    )
    record = parts.record(lead=True, progress=False)
    try:
        WorkerTags(simulator, record.runlog, unit)
        started = time.perf_counter()
        result = simulator.run()
        elapsed = time.perf_counter() - started
        write_history(record.runlog, result, unit)
    except BaseException:
        record.close()
        raise
    final = result.final
    run = RunFigures(  # wall time, worker steps, exchanges, server updates, loss, error, why
        simulator.now * unit,
        result.steps,
        result.exchanges,
        final.server_updates,
        final.test_loss,
        final.test_error,
        STOP_REASONS[result.stop_reason],
    )
    details = {
        "clock": "virtual (cost model)",
        "cost_profile": figures.profile,
        "step_time_s": unit,
        "link_latency_s": figures.latency_s,
        "bandwidth_gbps": figures.bandwidth_gbps,
        "service_s": figures.service_s,
        "charged_params": figures.charged_params,
        "charges_in_steps": asdict(figures.charges),
        "simulation_s": elapsed,
        # which gradient path ran (sim.batched): the two agree to float rounding, not always bit
        # for bit, so a rerun that must match takes the same one
        "batched": simulator.batch is not None,
    }
    topology = "sequential" if not cfg.algorithm.uses_server else cfg.topology
    summary = Summary.of_run(cfg, run, topology=topology, num_params=num_params, details=details)
    return record.finish(summary)


def write_history(runlog: RunLog, result: SimResult, unit: float) -> None:
    """Every evaluation into metrics.csv and TensorBoard, on the virtual clock (seconds)."""
    for point in result.history:
        runlog.evaluation(
            wall_s=point.time * unit,
            exchanges=point.exchanges,
            server_updates=point.server_updates,
            worker_steps=point.steps,
            test_loss=point.test_loss,
            test_error=point.test_error,
        )
