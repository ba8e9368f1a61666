"""The paper's 7-layer CIFAR-10 network (Zhang et al. 2015, Section 5).

Three convolutional layers (64 5x5, 128 5x5, 64 3x3 filters) with ReLU, max-pooling (3x3,
stride 2) after the first two, then two fully connected layers of 256 units and the classifier.
The paper feeds 28x28 random crops; here the input size is taken as given.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from easgd.models.lenet import flat_size, image_shape


class Cifar7(nn.Module):
    """conv-pool-conv-pool-conv-fc-fc (+ classifier)."""

    def __init__(self, input_shape: Sequence[int], num_classes: int) -> None:
        super().__init__()
        self.shape = image_shape(input_shape)
        self.features = nn.Sequential(
            nn.Conv2d(self.shape[0], 64, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
            nn.Conv2d(64, 128, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
            nn.Conv2d(128, 64, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(flat_size(self.features, self.shape), 256),
            nn.ReLU(),
            nn.Linear(256, 256),
            nn.ReLU(),
            nn.Linear(256, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x.reshape(-1, *self.shape)))
