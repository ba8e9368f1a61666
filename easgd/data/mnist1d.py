"""MNIST-1D (Greydanus, 2020): 10 classes of 1-D signals of length 40, generated offline.

The ``mnist1d`` package's own generator builds the dataset from its ten templates with the
paper's default transformations (padding, translation, scaling, shear, correlated and i.i.d.
noise), so nothing is downloaded. With the default seed (42) this is the standard split: 4,000
training and 1,000 test sequences. Its paper reports about 32% test accuracy for logistic
regression, 68% for an MLP and 94% for a small CNN: methods separate here, unlike on the 8x8
digits where every reasonable run ends near 97%.

``data.train_subset`` (any dataset) keeps only the first n training sequences: the overfitting
regime, a network much larger than the data needs, where the paper's exploration argument applies.

Generating the split takes seconds of CPU, paid by every process that loads it (each rank of a
run, each benchmark worker), so the arrays are kept in ``$EASGD_CACHE_DIR`` (default
``~/.cache/easgd``), one ``.npz`` per size, seed and version of the generator and its libraries.
"""

from __future__ import annotations

import os
import zipfile
from functools import lru_cache
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

from easgd.data.split import Split

STANDARD_SEED = 42
"""The seed of the published MNIST-1D split."""


ARRAYS = ("x", "y", "x_test", "y_test")


def cache_file(num_samples: int, seed: int) -> Path:
    """Where the generated split is kept: ``$EASGD_CACHE_DIR`` or ``~/.cache/easgd``."""
    root = os.environ.get("EASGD_CACHE_DIR") or Path.home() / ".cache" / "easgd"
    versions = "-".join(version(package) for package in ("mnist1d", "numpy", "scipy"))
    return Path(root) / f"mnist1d_n{num_samples}_seed{seed}_{versions}.npz"


@lru_cache(maxsize=4)
def _generate(num_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    path = cache_file(num_samples, seed)
    try:
        with np.load(path) as saved:
            x, y, x_test, y_test = (saved[name] for name in ARRAYS)
            return x, y, x_test, y_test
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        pass  # not there yet, or unreadable: generate it (again)
    x, y, x_test, y_test = _make(num_samples, seed)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # a name of this process's own: ranks that generate at once never share a half-written file
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as handle:
            np.savez(handle, x=x, y=y, x_test=x_test, y_test=y_test)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache folder: every load generates
    return x, y, x_test, y_test


def _make(num_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The ``mnist1d`` package's generator with its default transformations."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise ValueError(
            "data.name=mnist1d needs the 'mnist1d' package (pip install mnist1d)"
        ) from err
    args = get_dataset_args()
    args.num_samples, args.seed = num_samples, seed
    # the generator seeds numpy's global state; leave the caller's state as it was
    state = np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(state)
    return data["x"], data["y"], data["x_test"], data["y_test"]


def load_mnist1d(*, num_samples: int = 5000, seed: int = STANDARD_SEED) -> Split:
    """MNIST-1D as float32 sequences of shape (1, 40) and int64 labels (80/20 train/test)."""
    if num_samples < 50:
        raise ValueError(f"num_samples must be >= 50 for mnist1d, got {num_samples}")
    train_x, train_y, test_x, test_y = _generate(num_samples, seed)

    def features(array: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(array), dtype=torch.float32).unsqueeze(1)

    def labels(array: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(array), dtype=torch.int64)

    return Split(
        name="mnist1d",
        train_x=features(train_x),
        train_y=labels(train_y),
        test_x=features(test_x),
        test_y=labels(test_y),
        num_classes=10,
    )
