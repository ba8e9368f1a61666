"""A model with buffers (BatchNorm running statistics), for tests/test_buffers.py."""

from __future__ import annotations

import math

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
