"""Shared test setup: one intra-op thread (the suite runs on 2 cores) and float64 helpers."""

from __future__ import annotations

import torch

torch.set_num_threads(1)


def f64(*values: float) -> torch.Tensor:
    """A float64 vector from literal values."""
    return torch.tensor(values, dtype=torch.float64)
