"""A synthetic teacher-student classification task with a size knob.

Inputs are standard Gaussian; a random one-hidden-layer teacher network (seeded) labels each input
with the argmax of its outputs. A student of enough capacity can reach low error, and the task
scales freely in examples, features and classes.
"""

from __future__ import annotations

import torch

from easgd.data.split import Split, fixed_split


def make_teacher_student(
    *,
    num_samples: int = 4000,
    num_features: int = 32,
    num_classes: int = 10,
    teacher_hidden: int = 64,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Split:
    """Generate the task deterministically from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(num_samples, num_features, generator=generator)
    w1 = torch.randn(num_features, teacher_hidden, generator=generator) / num_features**0.5
    w2 = torch.randn(teacher_hidden, num_classes, generator=generator) / teacher_hidden**0.5
    labels = (torch.tanh(inputs @ w1) @ w2).argmax(dim=1)
    return fixed_split(inputs, labels, test_fraction=test_fraction, seed=seed, name="synthetic")
