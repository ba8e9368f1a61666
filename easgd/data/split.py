"""In-memory train/test tensors and the seeded split shared by the built-in datasets."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass(frozen=True)
class Split:
    """Train and test tensors of one dataset (features keep their natural shape)."""

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example."""
        return tuple(self.train_x.shape[1:])

    def subset(self, num_train: int) -> Split:
        """The same split with only the first ``num_train`` training examples (test set kept)."""
        if not 1 <= num_train <= len(self.train_y):
            raise ValueError(
                f"data.train_subset={num_train} must be in [1, {len(self.train_y)}] "
                f"({self.name} has {len(self.train_y)} training examples)"
            )
        return replace(self, train_x=self.train_x[:num_train], train_y=self.train_y[:num_train])


def fixed_split(
    features: Tensor, labels: Tensor, *, test_fraction: float, seed: int, name: str
) -> Split:
    """Shuffle with ``seed`` and cut off ``test_fraction`` of the examples as the test set."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"data.test_fraction must be in (0, 1), got {test_fraction!r}")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    num_test = max(1, round(len(labels) * test_fraction))
    test, train = order[:num_test], order[num_test:]
    return Split(
        name=name,
        train_x=features[train],
        train_y=labels[train],
        test_x=features[test],
        test_y=labels[test],
        num_classes=int(labels.max()) + 1,
    )
