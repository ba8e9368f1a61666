"""Objectives the simulator can drive: closed-form quadratics and a real model on a real dataset.

An objective hands out a starting point, a stochastic gradient for worker i (drawn from that
worker's own generator, so the run is reproducible), and an evaluation of a point. A
:class:`BatchedObjective` also takes the gradients of k points in one call, each drawn from its
own generator exactly as k calls of ``gradient`` would draw them (the simulator's batched path).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from easgd.data.split import Split
from easgd.flat import FlatModel


class Objective(Protocol):
    """What the simulator needs from a problem."""

    def initial_point(self) -> Tensor:
        """The common starting point of the center and all workers."""
        ...

    def gradient(self, point: Tensor, generator: torch.Generator) -> tuple[float, Tensor]:
        """(loss, stochastic gradient) at ``point``, noise drawn from ``generator``."""
        ...

    def evaluate(self, point: Tensor) -> dict[str, float]:
        """At least ``test_loss`` and ``test_error`` of ``point``."""
        ...


@runtime_checkable
class BatchedObjective(Objective, Protocol):
    """An objective that also serves k gradients in one call."""

    def batch_support(self, *, speed: bool = False) -> str | None:
        """None when :meth:`gradients` serves this objective; otherwise why it does not
        (``speed``: also when it is expected to be slower here than one call per point)."""
        ...

    def gradients(
        self, points: Tensor, generators: Sequence[torch.Generator]
    ) -> tuple[Tensor, Tensor]:
        """(losses (k,), gradients (k, n)) at the rows of ``points``; row j's noise is drawn
        from ``generators[j]``, the same draws as ``gradient(points[j], generators[j])``."""
        ...


class Quadratic:
    """F(x) = 1/2 sum_j h_j x_j^2, optionally with Gaussian gradient noise; minimum at 0.

    ``test_error`` is ||x||, the distance to the minimum.
    """

    def __init__(
        self,
        start: Tensor,
        *,
        curvature: Tensor | float = 1.0,
        noise_std: float = 0.0,
    ) -> None:
        self.start = start.to(torch.float64)
        self.curvature = torch.as_tensor(curvature, dtype=torch.float64)
        self.noise_std = noise_std

    def initial_point(self) -> Tensor:
        return self.start.clone()

    def gradient(self, point: Tensor, generator: torch.Generator) -> tuple[float, Tensor]:
        grad = self.curvature * point
        if self.noise_std:
            noise = torch.randn(point.shape, dtype=point.dtype, generator=generator)
            grad = grad + self.noise_std * noise
        return self._loss(point), grad

    def batch_support(self, *, speed: bool = False) -> str | None:
        return None

    def gradients(
        self, points: Tensor, generators: Sequence[torch.Generator]
    ) -> tuple[Tensor, Tensor]:
        # elementwise, row by row the same operations as gradient(): equal bit for bit
        grads = self.curvature * points
        if self.noise_std:
            noise = torch.stack(
                [
                    torch.randn(row.shape, dtype=row.dtype, generator=g)
                    for row, g in zip(points, generators, strict=True)
                ]
            )
            grads = grads + self.noise_std * noise
        losses = torch.tensor([self._loss(row) for row in points], dtype=torch.float64)
        return losses, grads

    def _loss(self, point: Tensor) -> float:
        return float(0.5 * (self.curvature * point * point).sum())

    def evaluate(self, point: Tensor) -> dict[str, float]:
        return {"test_loss": self._loss(point), "test_error": float(point.norm())}


class ClassifierObjective:
    """A torch classifier on a :class:`Split`: minibatches sampled from the whole training set."""

    def __init__(
        self,
        module: nn.Module,
        split: Split,
        *,
        batch_size: int = 128,
        weight_decay: float = 0.0,
    ) -> None:
        self.flat = FlatModel(module, weight_decay=weight_decay)
        self.split = split
        self.batch_size = batch_size
        self._start = self.flat.initial_point()

    def initial_point(self) -> Tensor:
        return self._start.clone()

    def gradient(self, point: Tensor, generator: torch.Generator) -> tuple[float, Tensor]:
        index = torch.randint(len(self.split.train_y), (self.batch_size,), generator=generator)
        return self.flat.loss_and_grad(point, self.split.train_x[index], self.split.train_y[index])

    def batch_support(self, *, speed: bool = False) -> str | None:
        return self.flat.batch_support(speed=speed)

    def gradients(
        self, points: Tensor, generators: Sequence[torch.Generator]
    ) -> tuple[Tensor, Tensor]:
        # each worker's indices from its own generator, as gradient() draws them
        index = torch.stack(
            [torch.randint(len(self.split.train_y), (self.batch_size,), generator=g)
             for g in generators]
        )  # fmt: skip
        return self.flat.stacked_loss_and_grad(
            points, self.split.train_x[index], self.split.train_y[index]
        )

    def evaluate(self, point: Tensor) -> dict[str, float]:
        return self.flat.evaluate(point, self.split.test_x, self.split.test_y)
