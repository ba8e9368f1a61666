"""The worker tags of a ``mode=simulate`` run, written to TensorBoard as a real run writes them.

A real server writes, at every accepted exchange of worker rank r (1..p), indexed by the worker's
step: ``worker{r}/train_loss`` (its mean minibatch loss since its previous exchange),
``worker{r}/elastic_distance`` (||x_i - center||, elastic rules only), ``worker{r}/staleness`` and
``worker{r}/exchange_latency_ms``; a sequential baseline writes ``worker1/train_loss`` every step.
A simulated run writes the same train loss and elastic distance tags, stamped with the virtual
time of the exchange. It does not write ``staleness`` or ``exchange_latency_ms``: with
communication costs a reply lands after other workers' updates, which the worker's observer
cannot tell apart from its own.
"""

from __future__ import annotations

from torch import Tensor

from easgd.parts.runlog import RunLog
from easgd.roles import WorkerRole
from easgd.roles.worker import ReplyHook
from easgd.sim import Simulator


class WorkerTags:
    """Subscribes to ``simulator`` (its gradients, its workers' replies) and writes the worker
    tags into ``runlog``; ``unit``: seconds per virtual time unit (the TensorBoard wall time)."""

    def __init__(self, simulator: Simulator, runlog: RunLog, unit: float) -> None:
        self.simulator, self.runlog, self.unit = simulator, runlog, unit
        self._loss_sums = [0.0] * len(simulator.workers)
        self._loss_counts = [0] * len(simulator.workers)
        if not runlog.writes_scalars:
            return
        simulator.on_gradient.append(self._gradient)
        if simulator.server is not None:
            for index, role in enumerate(simulator.workers):
                role.after_reply.append(self._reply_observer(index))

    def _walltime(self) -> float:
        return self.runlog.started + self.simulator.now * self.unit

    def _gradient(self, worker: int, loss: float) -> None:
        if self.simulator.server is None:  # a sequential baseline: every step, as its real run
            step = self.simulator.workers[worker].step + 1  # the step this gradient makes
            self.runlog.scalar("worker1/train_loss", loss, step, walltime=self._walltime())
            return
        self._loss_sums[worker] += loss
        self._loss_counts[worker] += 1

    def _reply_observer(self, worker: int) -> ReplyHook:
        tag = f"worker{worker + 1}"  # the rank of the worker in a real run (rank 0: the server)

        def after_reply(role: WorkerRole, reply: Tensor) -> None:
            count = self._loss_counts[worker]
            mean = self._loss_sums[worker] / count if count else 0.0
            self._loss_sums[worker], self._loss_counts[worker] = 0.0, 0
            walltime = self._walltime()
            self.runlog.scalar(f"{tag}/train_loss", mean, role.step, walltime=walltime)
            server = self.simulator.server
            distance = server.elastic_distance(reply) if server is not None else None
            if distance is not None:
                self.runlog.scalar(
                    f"{tag}/elastic_distance", distance, role.step, walltime=walltime
                )

        return after_reply
