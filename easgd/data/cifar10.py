"""CIFAR-10 from the standard python batches (``cifar-10-batches-py``) in a local folder.

The batches are pickles; they are read with an unpickler that only admits the few numpy
constructors those files use, so a tampered file cannot run code.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from easgd.data.mnist import DatasetFileError
from easgd.data.split import Split

TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR-10 batch")


def _load_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as handle:
            batch = _SafeUnpickler(io.BytesIO(handle.read()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise DatasetFileError(f"{path} is not a valid CIFAR-10 python batch: {err}") from None
    if not isinstance(batch, dict):
        raise DatasetFileError(f"{path} is not a valid CIFAR-10 python batch (not a dict)")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise DatasetFileError(f"{path} lacks the 'data' or 'labels' entry of a CIFAR-10 batch")
    data = np.asarray(data, dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DatasetFileError(
            f"{path} has data of shape {data.shape} and {len(labels)} labels; expected (N, 3072) and N"
        )
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def cifar10_folder(root: str | Path) -> Path:
    """The folder holding the six batches (``root`` or ``root/cifar-10-batches-py``); checks presence."""
    folder = Path(root).expanduser()
    if (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    missing = [name for name in (*TRAIN_FILES, TEST_FILE) if not (folder / name).is_file()]
    if missing:
        raise DatasetFileError(
            f"CIFAR-10 file(s) {', '.join(missing)} not found in {folder}; extract "
            "cifar-10-python.tar.gz there (data_batch_1..5 and test_batch) and set data.root"
        )
    return folder


def load_cifar10(root: str | Path) -> Split:
    """CIFAR-10 as float32 (N, 3, 32, 32), normalised per channel, and int64 labels."""
    folder = cifar10_folder(root)
    train = [_load_batch(folder / name) for name in TRAIN_FILES]
    test_x, test_y = _load_batch(folder / TEST_FILE)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)

    def images(a: np.ndarray) -> torch.Tensor:
        return (torch.from_numpy(a).float() / 255.0 - mean) / std

    return Split(
        name="cifar10",
        train_x=images(np.concatenate([x for x, _ in train])),
        train_y=torch.from_numpy(np.concatenate([y for _, y in train])),
        test_x=images(test_x),
        test_y=torch.from_numpy(test_y),
        num_classes=10,
    )
