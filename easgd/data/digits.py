"""scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes): real and offline.

Pixels are scaled from 0..16 to 0..1 and flattened to 64 features. The train/test split is fixed
by a seed, so every process of a run (and every run with that seed) sees the same split.
"""

from __future__ import annotations

import torch

from easgd.data.split import Split, fixed_split


def load_digits_split(*, test_fraction: float = 0.2, seed: int = 0) -> Split:
    """The digits dataset as float32 features in [0, 1] and int64 labels, split by ``seed``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    features = torch.as_tensor(bunch.data, dtype=torch.float32) / 16.0
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    return fixed_split(features, labels, test_fraction=test_fraction, seed=seed, name="digits")
