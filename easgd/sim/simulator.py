"""Deterministic simulator: p workers and the server in one process, on a virtual clock.

The simulator drives the same worker and server roles as the distributed runtime, so the update
rules exist once. Time is virtual: a worker at speed 1 takes one time unit per step, a straggler
with slowdown s takes s units. Schedules:

- ``synchronous``: all workers step together each tick; elastic exchanges of one tick all read the
  same center and the server applies their sum (synchronous EASGD).
- ``round_robin``: at tick t only worker t mod p acts (the paper's stability analysis).
- ``asynchronous``: each worker steps at its own pace; ties go to the lower worker id.

Communication delay: ``read_staleness`` k makes a worker read the center as it was k server
updates ago; ``push_delay`` d makes its message reach the server d time units late.

Communication cost on the synchronous schedule (``cost``): every round of exchanges is one ring
all-reduce of the model that every worker waits for (:func:`easgd.sim.cost.ring_allreduce_time`),
the all-reduce topology's clock.

Communication cost (``cost``, asynchronous schedule): every exchange is charged latency and
transfer each way plus the server's service time, the server serves one exchange at a time in
arrival order, and a blocking worker takes its next gradient step when the reply arrives (an
overlapping one, ``overlap``, keeps stepping and applies the reply when it comes). With all charges
zero this is exactly the clock without costs. See :mod:`easgd.sim.cost`.

Batched gradients (``batched``, :mod:`easgd.sim.batched`): each worker's gradient step waits
until something needs that worker again, and the waiting steps of many workers are taken in one
batched call. Gradient steps of different workers commute (each touches only its own x_i and its
own minibatch stream), while exchanges stay in virtual-time order, so every schedule, straggler
and cost charge keeps its semantics; the result equals the one-call-per-step path's (bit for bit
on a quadratic, within float rounding on a network: tests/test_sim_batched.py).

The same seed (and the same ``batched`` choice) gives a bit-identical result.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from easgd import algorithms as alg
from easgd.algorithms.schedules import LearningRateSchedule
from easgd.comm.compression import check_format
from easgd.config.algorithm import AlgorithmConfig
from easgd.roles import (
    GradientFn,
    ServerRole,
    WorkerRole,
    exchange_if_due,
    gradient_step,
    make_server_role,
    make_worker_role,
)
from easgd.roles.links import ServerLink, WorkerLink, compression_of
from easgd.sim.batched import DeferredSteps, batching_refusal, check_batched
from easgd.sim.cost import ExchangeCost, ExchangeTimes, ServerQueue, ring_allreduce_time
from easgd.sim.objectives import BatchedObjective, Objective

SCHEDULES = ("synchronous", "round_robin", "asynchronous")


@dataclass
class SimConfig:
    """How the simulated cluster runs."""

    num_workers: int = 4
    """p, the number of workers (sequential algorithms use 1)."""
    comm_period: int = 10
    """tau, local steps between exchanges."""
    schedule: str = "asynchronous"
    """synchronous, round_robin or asynchronous."""
    duration: float = 500.0
    """Virtual time to run (time units; one step of a speed-1 worker is one unit)."""
    slowdown: list[float] = field(default_factory=list)
    """Per-worker step duration (stragglers > 1); empty means all 1."""
    read_staleness: int = 0
    """k: the center a worker reads is k server updates old."""
    push_delay: float = 0.0
    """Virtual time a worker's message takes to reach the server."""
    eval_interval: float = 25.0
    """Virtual time between evaluations of the evaluated variable (inf: by steps only)."""
    eval_interval_steps: int | None = None
    """Also evaluate when the workers' total steps first reach each multiple of this."""
    seed: int = 0
    """Seeds every worker's minibatch generator."""
    cost: ExchangeCost | None = None
    """Charges of each exchange (asynchronous schedule), or of each round as one ring all-reduce
    (synchronous schedule); None: exchanges are free."""
    overlap: bool = False
    """With a cost: elastic workers keep stepping while their exchange is in flight."""
    steps_per_worker: int | None = None
    """Each worker stops after this many local steps (None: only ``duration`` stops the run)."""
    target_test_error: float | None = None
    """Stop at the first evaluation whose test error is at most this (None: never)."""
    record_exchanges: bool = False
    """With a cost: keep every exchange's :class:`ExchangeTimes` in the result."""
    compression: str = "none"
    """Wire format of exchanges (``comm.compression``), applied by :mod:`easgd.roles.links`."""
    error_feedback: bool = True
    """``comm.error_feedback``: increments carry their rounding into the next message."""
    lr_schedule: LearningRateSchedule | None = None
    """eta_t at each worker's local step t_i (None: the constant eta), as in a real run."""
    max_grad_norm: float | None = None
    """Clip each worker's gradients to this global norm (None: never), as in a real run."""
    batched: str = "auto"
    """Gradient steps of many workers in one batched call (:mod:`easgd.sim.batched`): auto (when
    the objective serves it, p > 1 and it is expected to be faster: not for convolutions on a
    CPU), true (an error when it cannot), false (one call per step)."""

    def __post_init__(self) -> None:
        self.batched = check_batched(self.batched)
        alg.hyperparams.check_num_workers(self.num_workers)
        alg.hyperparams.check_comm_period(self.comm_period)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"sim.schedule={self.schedule!r}; allowed: {', '.join(SCHEDULES)}")
        if self.slowdown and (len(self.slowdown) != self.num_workers or min(self.slowdown) <= 0):
            raise ValueError(
                f"sim.slowdown needs {self.num_workers} positive factors, got {self.slowdown!r}"
            )
        if self.read_staleness < 0 or self.push_delay < 0:
            raise ValueError("sim.read_staleness and sim.push_delay must be >= 0")
        if self.duration <= 0 or self.eval_interval <= 0:
            raise ValueError("sim.duration and sim.eval_interval must be > 0")
        if self.cost is not None:
            if self.schedule == "round_robin" or (self.schedule == "synchronous" and self.overlap):
                raise ValueError(
                    "sim.cost is charged on the asynchronous schedule and (rounds as ring "
                    f"all-reduces, no overlap) the synchronous one, not {self.schedule!r}"
                    + (" with sim.overlap" if self.schedule == "synchronous" else "")
                )
            if self.read_staleness or self.push_delay:
                raise ValueError(
                    "sim.cost replaces sim.read_staleness and sim.push_delay: set those to 0"
                )
        elif self.overlap:
            raise ValueError("sim.overlap needs a sim.cost (without costs nothing is in flight)")
        if self.eval_interval_steps is not None and self.eval_interval_steps < 1:
            raise ValueError(
                f"sim.eval_interval_steps must be >= 1, got {self.eval_interval_steps!r}"
            )
        if self.steps_per_worker is not None and self.steps_per_worker < 1:
            raise ValueError(f"sim.steps_per_worker must be >= 1, got {self.steps_per_worker!r}")
        if self.duration == float("inf") and self.steps_per_worker is None:
            raise ValueError("an infinite sim.duration needs sim.steps_per_worker")
        check_format(self.compression)
        if self.compression != "none" and (
            self.schedule == "synchronous" or self.read_staleness or self.push_delay
        ):
            raise ValueError(
                "comm.compression is simulated on the asynchronous and round_robin schedules "
                "without read_staleness or push_delay"
            )


@dataclass
class EvalPoint:
    """One evaluation of the evaluated variable."""

    time: float
    steps: int
    exchanges: int
    test_loss: float
    test_error: float
    server_updates: int = 0
    """Center updates so far (the server's clock s)."""


@dataclass
class SimResult:
    """What a simulated run produced."""

    algorithm: str
    history: list[EvalPoint]
    evaluated: Tensor
    workers: list[Tensor]
    exchanges: int
    steps: int
    stop_reason: str = "duration"
    """duration, steps (every worker spent its step budget) or target_test_error."""
    exchange_log: list[ExchangeTimes] = field(default_factory=list)
    """Every exchange's times (with a cost and ``record_exchanges``)."""

    @property
    def final(self) -> EvalPoint:
        """The last evaluation."""
        return self.history[-1]


class Simulator:
    """Runs one algorithm on one objective under a :class:`SimConfig`."""

    def __init__(self, algorithm: AlgorithmConfig, sim: SimConfig, objective: Objective) -> None:
        self.algorithm = algorithm
        self.sim = sim
        self.objective = objective
        start = objective.initial_point()
        num_workers = sim.num_workers if algorithm.uses_server else 1
        self.workers: list[WorkerRole] = [
            make_worker_role(
                algorithm,
                start,
                comm_period=sim.comm_period,
                schedule=sim.lr_schedule,
                max_grad_norm=sim.max_grad_norm,
            )
            for _ in range(num_workers)
        ]
        self.server: ServerRole | None = (
            make_server_role(algorithm, start, num_workers=num_workers)
            if algorithm.uses_server
            else None
        )
        self.generators = [
            torch.Generator().manual_seed(sim.seed * 1_000_003 + i) for i in range(num_workers)
        ]
        self.speeds = sim.slowdown if (sim.slowdown and num_workers > 1) else [1.0] * num_workers
        self.exchanges = 0
        self.now = 0.0
        self._in_flight: list[tuple[float, int, Callable[[], object]]] = []
        self._sequence = 0
        self._center_history: deque[Tensor] = deque(maxlen=sim.read_staleness + 1)
        if self.server is not None:
            self._center_history.append(self.server.center.clone())
        self._stop_reason: str | None = None
        self._next_eval = sim.eval_interval
        self._next_eval_steps = sim.eval_interval_steps or 0
        self._finished_at = 0.0
        self._exchange_log: list[ExchangeTimes] = []
        self.on_gradient: list[Callable[[int, float], None]] = []
        """Called with (worker index, minibatch loss) after every gradient (run logs subscribe)."""
        self._round_time = 0.0  # the synchronous schedule's ring all-reduce per round
        if sim.cost is not None and sim.schedule == "synchronous":
            self._round_time = ring_allreduce_time(sim.cost, num_workers)
        self.batch = self._batching()
        """The batched path's pending gradient steps (None: one gradient call per step)."""
        self.links: list[tuple[WorkerLink, ServerLink]] = []
        """Each worker's compressed link to the server (empty: float32 messages)."""
        if self.server is not None and sim.compression != "none":
            compression = compression_of(
                algorithm, sim.compression, sim.error_feedback, start.numel()
            )
            self.links = [
                (compression.worker_link(start), ServerLink(compression, start))
                for _ in self.workers
            ]

    # -- batched gradient steps (easgd.sim.batched) -------------------------------------------
    def _batching(self) -> DeferredSteps | None:
        if self.sim.batched == "false":
            return None
        refusal = batching_refusal(
            self.objective, len(self.workers), speed=self.sim.batched == "auto"
        )
        if refusal is not None and self.sim.batched == "auto":
            return None
        if refusal is not None:
            raise ValueError(
                f"sim.batched=true, but the batched path cannot serve this run: {refusal}"
            )
        assert isinstance(self.objective, BatchedObjective)
        return DeferredSteps(self.workers, self.objective, self.generators, self.on_gradient)

    def _gradient_step(self, worker: int) -> None:
        """The gradient half of ``worker``'s step: now, or deferred on the batched path."""
        if self.batch is not None:
            self.batch.defer(worker)
        else:
            gradient_step(self.workers[worker], self._gradient(worker))

    def _touch(self, worker: int) -> None:
        """Before ``worker``'s variables are read or changed: its pending gradient step lands."""
        if self.batch is not None:
            self.batch.touch(worker)

    def _flush(self) -> None:
        """Every pending gradient step lands (before an evaluation, at the end)."""
        if self.batch is not None:
            self.batch.flush()

    def _local_steps(self, worker: int) -> int:
        """t_i of ``worker``, counting a pending gradient step as taken."""
        pending = self.batch.pending(worker) if self.batch is not None else 0
        return self.workers[worker].step + pending

    def _total_steps(self) -> int:
        """Every worker's steps so far, pending ones included."""
        pending = self.batch.count if self.batch is not None else 0
        return sum(role.step for role in self.workers) + pending

    # -- the channel between a worker and the server ---------------------------------------
    def _delayed(self) -> bool:
        return self.sim.read_staleness > 0 or self.sim.push_delay > 0

    def _deliver(self, action: Callable[[], object]) -> None:
        if self.sim.push_delay > 0:
            self._sequence += 1
            heapq.heappush(
                self._in_flight, (self.now + self.sim.push_delay, self._sequence, action)
            )
        else:
            action()
            self._record_center()

    def _record_center(self) -> None:
        """Keep the last k + 1 centers, for stale reads (nothing to keep without delay)."""
        assert self.server is not None
        if self._delayed():
            self._center_history.append(self.server.center.clone())  # roles update it in place

    def _arrive_until(self, time: float) -> None:
        while self._in_flight and self._in_flight[0][0] <= time:
            _, _, action = heapq.heappop(self._in_flight)
            action()
            self._record_center()

    def _exchange(self, worker: int, payload: Tensor | None) -> Tensor:
        server = self.server
        assert server is not None
        self.exchanges += 1
        if self.links:
            worker_link, server_link = self.links[worker]
            wire = server_link.handle(server, worker, worker_link.send(payload))
            return worker_link.receive(wire)
        if not self._delayed():
            reply = server.handle(worker, payload)
            self._record_center()
            return reply
        read = self._center_history[0]  # the center k updates ago (or the oldest kept)
        reply, update = server.handle_delayed(worker, payload, read)
        self._deliver(update)
        return reply

    # -- schedules ----------------------------------------------------------------------------
    def _step(self, worker: int) -> None:
        """One step t_i of ``worker``: the exchange when due, then the gradient step (the order
        of :func:`easgd.roles.worker_step`; the gradient half may be deferred)."""
        self._touch(worker)
        exchange_if_due(self.workers[worker], lambda payload: self._exchange(worker, payload))
        self._gradient_step(worker)

    def _gradient(self, worker: int) -> GradientFn:
        """Worker ``worker``'s gradient function: the objective on its own minibatch stream (the
        :attr:`on_gradient` observers see each minibatch loss)."""
        generator = self.generators[worker]

        def gradient(point: Tensor) -> tuple[float, Tensor]:
            loss, grad = self.objective.gradient(point, generator)
            for hook in self.on_gradient:
                hook(worker, float(loss))
            return loss, grad

        return gradient

    def _synchronous_tick(self) -> None:
        server = self.server
        if server is not None and server.synchronous_round and not self._delayed():
            self._flush()
            due = [role for role in self.workers if role.due()]
            sent = []
            for role in due:
                payload = role.outgoing()
                assert payload is not None
                sent.append(payload)
            if due:
                for role, reply in zip(due, server.handle_round(sent), strict=True):
                    role.incoming(reply)
                self.exchanges += len(due)
                self._record_center()
            for worker in range(len(self.workers)):
                self._gradient_step(worker)
        else:
            for worker in range(len(self.workers)):
                self._step(worker)

    def evaluated(self) -> Tensor:
        """The variable under test: the server's (center or z), or the single worker's."""
        return self.server.evaluated() if self.server is not None else self.workers[0].evaluated()

    def _evaluate(self, history: list[EvalPoint]) -> None:
        self._flush()
        metrics = self.objective.evaluate(self.evaluated())
        history.append(
            EvalPoint(
                time=self.now,
                steps=sum(role.step for role in self.workers),
                exchanges=self.exchanges,
                test_loss=metrics["test_loss"],
                test_error=metrics["test_error"],
                server_updates=self.server.updates if self.server is not None else 0,
            )
        )
        target = self.sim.target_test_error
        if target is not None and metrics["test_error"] <= target:
            self._stop_reason = "target_test_error"

    def _spent(self, worker: int, started: float) -> bool:
        """Whether ``worker``, whose last step started at ``started``, spent its step budget."""
        budget = self.sim.steps_per_worker
        if budget is None or self._local_steps(worker) < budget:
            return False
        self._finished_at = max(self._finished_at, started + self.speeds[worker])
        return True

    def _evaluate_until(
        self, time: float, history: list[EvalPoint], *, arrive: bool = True
    ) -> None:
        """Every evaluation due at or before ``time`` (``arrive``: in-flight updates land first)."""
        while self._next_eval <= time and self._stop_reason is None:
            self.now = self._next_eval
            if arrive:
                self._arrive_until(self._next_eval)
            self._evaluate(history)
            self._next_eval += self.sim.eval_interval
        every = self.sim.eval_interval_steps
        steps = self._total_steps()
        if every is not None and self._stop_reason is None and steps >= self._next_eval_steps:
            self.now = time
            if arrive:
                self._arrive_until(time)
            self._evaluate(history)
            self._next_eval_steps = (steps // every + 1) * every

    def run(self) -> SimResult:
        """Run until ``duration`` (or a step budget or target) and return the evaluation history."""
        history: list[EvalPoint] = []
        self._evaluate(history)
        end = self.sim.duration
        if self.sim.cost is not None and self.sim.schedule == "asynchronous":
            end = self._run_with_cost(history)
        elif self.sim.schedule == "asynchronous":
            end = self._run_asynchronous(history)
        else:
            end = self._run_ticks(history)
        self._flush()
        self.now = end
        self._arrive_until(float("inf"))
        for worker, role in enumerate(self.workers):
            final = role.final_outgoing()
            if final is not None:
                self._exchange(worker, final)
        stop_reason = self._stop_reason
        if stop_reason is None:
            stop_reason = "duration" if end >= self.sim.duration else "steps"
        if stop_reason != "target_test_error":
            self._evaluate(history)
        return SimResult(
            algorithm=self.algorithm.name,
            history=history,
            evaluated=self.evaluated().clone(),
            workers=[role.params.clone() for role in self.workers],
            exchanges=self.exchanges,
            steps=sum(role.step for role in self.workers),
            stop_reason=stop_reason,
            exchange_log=self._exchange_log,
        )

    def _run_asynchronous(self, history: list[EvalPoint]) -> float:
        """Each worker at its own pace, exchanges free; returns the time the run ended."""
        events = [(0.0, worker) for worker in range(len(self.workers))]
        heapq.heapify(events)
        while events and events[0][0] < self.sim.duration:
            time, worker = heapq.heappop(events)
            self._evaluate_until(time, history)
            if self._stop_reason is not None:
                return self.now
            self.now = time
            self._arrive_until(time)
            self._step(worker)
            if not self._spent(worker, time):
                heapq.heappush(events, (time + self.speeds[worker], worker))
        return self.sim.duration if events else self._finished_at

    def _run_ticks(self, history: list[EvalPoint]) -> float:
        """The synchronous and round-robin schedules; returns the time the run ended.

        A tick is one step (1 time unit); a synchronous round adds its all-reduce time first."""
        tick, clock = 0, 0.0
        while clock < self.sim.duration:
            self._evaluate_until(clock, history, arrive=False)
            if self._stop_reason is not None:
                return self.now
            if all(self._spent(worker, clock - 1.0) for worker in range(len(self.workers))):
                return clock
            self.now = clock
            self._arrive_until(self.now)
            if self.sim.schedule == "synchronous":
                self._touch(0)
                clock += self._round_time if self.workers[0].due() else 0.0
                self._synchronous_tick()
            else:
                self._step(tick % len(self.workers))
            tick += 1
            clock += 1.0
        return self.sim.duration

    # -- the clock with communication costs ---------------------------------------------------
    def _run_with_cost(self, history: list[EvalPoint]) -> float:
        """Event-driven run where exchanges take time and queue at the server (:class:`_CostClock`)."""
        assert self.sim.cost is not None
        self.algorithm.spec.check_overlap(self.sim.overlap)
        return _CostClock(self).run(history)


_STEP, _SERVE, _REPLY = 0, 1, 2
"""Event kinds of the cost clock: a worker starts a step, the server serves, a reply lands."""


class _CostClock:
    """One run of a :class:`Simulator` on the clock with communication costs.

    Events are ordered by (time, worker, sequence): at equal times a worker's whole exchange
    completes before the next worker acts, which is the tie rule of the free clock, so zero
    charges replay it exactly. The server serves booked exchanges first come, first served. A
    blocking worker's gradient step waits for its reply; an overlapping one steps on and applies
    the reply when it lands (its next exchange waits for the previous one).
    """

    def __init__(self, sim: Simulator) -> None:
        assert sim.sim.cost is not None
        self.sim = sim
        self.queue = ServerQueue(sim.sim.cost)
        self.overlap = sim.sim.overlap
        self.events: list[tuple[float, int, int, int, Tensor | None]] = []
        self.booked: deque[tuple[ExchangeTimes, Tensor | None]] = deque()
        self.in_flight = [False] * len(sim.workers)
        self.waiting = [False] * len(sim.workers)
        self.sequence = 0

    def push(self, time: float, worker: int, kind: int, reply: Tensor | None = None) -> None:
        self.sequence += 1
        heapq.heappush(self.events, (time, worker, self.sequence, kind, reply))

    def finish_step(self, worker: int, time: float) -> None:
        """The gradient half of the step; the next step is due one step time later."""
        sim = self.sim
        sim._gradient_step(worker)
        if not sim._spent(worker, time):
            self.push(time + sim.speeds[worker], worker, _STEP)

    def start_step(self, worker: int, time: float) -> None:
        """A step starts: book the exchange when due (the server serves it in turn)."""
        self.sim._touch(worker)
        role = self.sim.workers[worker]
        if role.due():
            if self.in_flight[worker]:  # overlap: the previous exchange must land first
                self.waiting[worker] = True
                return
            times = self.queue.book(worker, time)
            payload = role.outgoing()
            if self.sim.links:  # a new message: it does not change while it travels
                payload = self.sim.links[worker][0].send(payload)
            elif payload is not None:
                # a copy: what was sent must not change while it travels (roles update in place)
                payload = payload.clone()
            self.booked.append((times, payload))
            self.push(times.served, worker, _SERVE)
            if not self.overlap:
                return  # the gradient step waits for the reply
            self.in_flight[worker] = True
        self.finish_step(worker, time)

    def serve(self) -> None:
        """The server handles the oldest booked exchange; its reply travels back."""
        sim = self.sim
        assert sim.server is not None
        times, payload = self.booked.popleft()
        sim.exchanges += 1
        if sim.sim.record_exchanges:
            sim._exchange_log.append(times)
        if sim.links:
            reply = sim.links[times.worker][1].handle(sim.server, times.worker, payload)
        else:
            reply = sim.server.handle(times.worker, payload)
        self.push(times.replied, times.worker, _REPLY, reply)

    def receive(self, worker: int, time: float, reply: Tensor | None, *, finishing: bool) -> None:
        """A reply lands: apply it, then go on with the step (blocking) or the waiting one."""
        self.sim._touch(worker)
        if reply is not None:
            if self.sim.links:
                reply = self.sim.links[worker][0].receive(reply)
            self.sim.workers[worker].incoming(reply)
        if finishing:
            return
        if not self.overlap:
            self.finish_step(worker, time)
        else:
            self.in_flight[worker] = False
            if self.waiting[worker]:
                self.waiting[worker] = False
                self.start_step(worker, time)

    def run(self, history: list[EvalPoint]) -> float:
        """Run to the end (budget, duration or a stop rule); returns the end time."""
        sim = self.sim
        for worker in range(len(sim.workers)):
            self.push(0.0, worker, _STEP)
        while self.events and self.events[0][0] < sim.sim.duration:
            time, worker, _, kind, reply = heapq.heappop(self.events)
            sim._evaluate_until(time, history)
            if sim._stop_reason is not None:
                break
            sim.now = time
            if kind == _STEP:
                self.start_step(worker, time)
            elif kind == _SERVE:
                self.serve()
            else:
                self.receive(worker, time, reply, finishing=False)
        if sim._stop_reason is not None:
            end = sim.now
        else:
            end = sim.sim.duration if self.events else sim._finished_at
        self.drain()
        return end

    def drain(self) -> None:
        """Messages already sent still reach the server; nobody takes another step."""
        while self.events:
            time, worker, _, kind, reply = heapq.heappop(self.events)
            if kind == _SERVE:
                self.serve()
            elif kind == _REPLY:
                self.receive(worker, time, reply, finishing=True)


def simulate(algorithm: AlgorithmConfig, sim: SimConfig, objective: Objective) -> SimResult:
    """Convenience wrapper: ``Simulator(algorithm, sim, objective).run()``."""
    return Simulator(algorithm, sim, objective).run()
