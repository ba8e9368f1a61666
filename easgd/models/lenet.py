"""A LeNet-style CNN: two 5x5 conv + ReLU + 2x2 max-pool blocks, then 120-84-classes dense layers."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn


def image_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    """(C, H, W) for image inputs; a flat square input (e.g. 64 = 8x8) is read as one channel."""
    if len(input_shape) == 3:
        return (int(input_shape[0]), int(input_shape[1]), int(input_shape[2]))
    if len(input_shape) == 2:
        return (1, int(input_shape[0]), int(input_shape[1]))
    side = math.isqrt(math.prod(input_shape))
    if side * side != math.prod(input_shape):
        raise ValueError(f"a CNN needs image inputs; got input shape {tuple(input_shape)}")
    return (1, side, side)


def flat_size(features: nn.Module, shape: tuple[int, int, int]) -> int:
    """Number of features ``features`` produces for one input of ``shape``."""
    with torch.no_grad():
        return int(features(torch.zeros(1, *shape)).numel())


class LeNet(nn.Module):
    """LeNet-5 layout with 'same' padding, so 8x8 digits, 28x28 MNIST and 32x32 CIFAR all fit."""

    def __init__(self, input_shape: Sequence[int], num_classes: int) -> None:
        super().__init__()
        self.shape = image_shape(input_shape)
        self.features = nn.Sequential(
            nn.Conv2d(self.shape[0], 6, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(flat_size(self.features, self.shape), 120),
            nn.ReLU(),
            nn.Linear(120, 84),
            nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x.reshape(-1, *self.shape)))
