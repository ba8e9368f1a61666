"""Restoring a role's variables from a checkpointed state dictionary."""

from __future__ import annotations

from typing import Any

from torch import Tensor


def restore(role: Any, state: dict[str, Tensor | int]) -> None:
    """Set every entry of ``state`` as an attribute of ``role`` (tensors copied)."""
    for key, value in state.items():
        setattr(role, key, value.clone() if isinstance(value, Tensor) else value)
