"""A small 1-D CNN for sequences such as MNIST-1D: the MNIST-1D paper's ConvNet layout.

Three convolutions (kernel 5, stride 2, padding 1) with ReLU, then one linear classifier. With
the default 25 channels it has about 5,000 parameters and reaches about 94% on MNIST-1D in the
paper.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn


class ConvNet1D(nn.Module):
    """Conv1d-ReLU x 3 (stride 2) and a linear layer; inputs (C, L) or flat (L,) sequences."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, channels: int = 25) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"model.channels must be >= 1, got {channels}")
        if len(input_shape) == 2:
            self.shape = (int(input_shape[0]), int(input_shape[1]))
        else:
            self.shape = (1, math.prod(input_shape))
        self.features = nn.Sequential(
            nn.Conv1d(self.shape[0], channels, 5, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            width = int(self.features(torch.zeros(1, *self.shape)).numel())
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x.reshape(-1, *self.shape)))
