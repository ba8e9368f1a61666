"""Test models: one with buffers (BatchNorm running statistics), one slow on rank 2."""

from __future__ import annotations

import math
import os
import time

import torch
from torch import nn


def bn_mlp(input_shape: tuple[int, ...], num_classes: int, hidden: int = 32) -> nn.Module:
    """Linear -> BatchNorm -> ReLU -> Linear."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def slow_on_rank2_mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """An MLP whose training forward pass sleeps 0.75 s on rank 2 only (a slow worker)."""
    return _SlowOnRank2(math.prod(input_shape), num_classes)


class _SlowOnRank2(nn.Module):
    def __init__(self, inputs: int, num_classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(), nn.Linear(inputs, 32), nn.ReLU(), nn.Linear(32, num_classes)
        )
        self.slow = os.environ.get("RANK") == "2"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.slow and self.training:
            time.sleep(0.75)
        return self.body(x)
