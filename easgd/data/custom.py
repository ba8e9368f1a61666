"""Any torch Dataset pair, through ``data.name=custom data.target=package.module.function``.

The function returns ``(train_dataset, test_dataset)``; each item is ``(input tensor, label)``.
The datasets are read once into memory (every worker samples from its own copy).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import Dataset

from easgd.data.split import Split


def _materialise(dataset: Dataset, which: str) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        items = [dataset[i] for i in range(len(dataset))]  # type: ignore[arg-type]
    except TypeError as err:
        raise ValueError(
            f"the custom {which} dataset needs __len__ and __getitem__: {err}"
        ) from None
    if not items:
        raise ValueError(f"the custom {which} dataset is empty")
    inputs = torch.stack([torch.as_tensor(x, dtype=torch.float32) for x, _ in items])
    labels = torch.as_tensor([int(y) for _, y in items], dtype=torch.int64)
    return inputs, labels


def load_custom(factory: Callable[..., Any], kwargs: dict[str, Any]) -> Split:
    """Call ``factory(**kwargs)`` for (train, test) datasets and load them as a :class:`Split`."""
    result = factory(**kwargs)
    if not (isinstance(result, tuple | list) and len(result) == 2):
        raise ValueError("data.target must return (train_dataset, test_dataset)")
    train_x, train_y = _materialise(result[0], "train")
    test_x, test_y = _materialise(result[1], "test")
    return Split(
        name="custom",
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        num_classes=int(max(train_y.max(), test_y.max())) + 1,
    )
