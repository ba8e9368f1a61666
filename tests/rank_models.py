"""Models for launch-error tests: one whose size depends on the process's rank (a user mistake)."""

from __future__ import annotations

import math
import os

from torch import nn


def rank_dependent_mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Rank 2 builds a wider hidden layer than every other rank."""
    hidden = 48 if os.environ.get("RANK") == "2" else 32
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )
