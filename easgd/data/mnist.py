"""MNIST from the standard IDX files in a local folder (gzipped or not); nothing is downloaded.

Expected in ``root``: train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte,
t10k-labels-idx1-ubyte, each optionally ending in ``.gz``.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch

from easgd.data.split import Split

FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049


class DatasetFileError(ValueError):
    """A dataset file is missing or malformed; the message names the file and the fix."""


def _find(root: Path, name: str) -> Path:
    for candidate in (
        root / name,
        root / f"{name}.gz",
        root / "raw" / name,
        root / "raw" / f"{name}.gz",
    ):
        if candidate.is_file():
            return candidate
    raise DatasetFileError(
        f"MNIST file {name} (or {name}.gz) not found in {root}; put the four standard IDX files "
        "there (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
        "t10k-labels-idx1-ubyte) or point data.root at their folder"
    )


def read_idx(path: Path, *, expected_magic: int) -> np.ndarray:
    """Read one IDX file (unsigned bytes), checking its magic number and size."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as err:
        raise DatasetFileError(f"cannot read {path}: {err}") from None
    if len(raw) < 8:
        raise DatasetFileError(f"{path} is too short to be an IDX file ({len(raw)} bytes)")
    magic, count = struct.unpack(">II", raw[:8])
    if magic != expected_magic:
        raise DatasetFileError(
            f"{path} has magic number {magic}, expected {expected_magic}; is it the right IDX file?"
        )
    dims = [count]
    offset = 8
    for _ in range((magic & 0xFF) - 1):
        (size,) = struct.unpack(">I", raw[offset : offset + 4])
        dims.append(size)
        offset += 4
    expected = int(np.prod(dims))
    body = np.frombuffer(raw, dtype=np.uint8, offset=offset)
    if body.size != expected:
        raise DatasetFileError(
            f"{path} declares {dims} = {expected} values but holds {body.size}; the file is truncated or corrupt"
        )
    return body.reshape(dims)


def mnist_files(root: str | Path) -> dict[str, Path]:
    """The four IDX files under ``root`` (cheap: checks presence only, reads nothing)."""
    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise DatasetFileError(
            f"data.root={folder} is not a folder; point it at the MNIST IDX files"
        )
    return {key: _find(folder, name) for key, name in FILES.items()}


def load_mnist(root: str | Path) -> Split:
    """The 60k/10k MNIST split as float32 images (N, 1, 28, 28) in [0, 1] and int64 labels."""
    folder = Path(root).expanduser()
    arrays = {
        key: read_idx(path, expected_magic=IMAGE_MAGIC if key.endswith("x") else LABEL_MAGIC)
        for key, path in mnist_files(folder).items()
    }
    for part in ("train", "test"):
        if len(arrays[f"{part}_x"]) != len(arrays[f"{part}_y"]):
            raise DatasetFileError(
                f"MNIST {part} images ({len(arrays[f'{part}_x'])}) and labels "
                f"({len(arrays[f'{part}_y'])}) differ in count in {folder}"
            )

    def images(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.float32) / 255.0).unsqueeze(1)

    def labels(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.int64))

    return Split(
        name="mnist",
        train_x=images(arrays["train_x"]),
        train_y=labels(arrays["train_y"]),
        test_x=images(arrays["test_x"]),
        test_y=labels(arrays["test_y"]),
        num_classes=10,
    )
