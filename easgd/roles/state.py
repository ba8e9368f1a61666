"""A role's variables as a checkpointable state dictionary, and its strict restore.

Roles update their tensors in place, so a state dictionary holds copies (a checkpoint written
while training goes on is never torn), and a restore copies into the role's own tensors after
checking that the keys and shapes are exactly the role's: a checkpoint of another algorithm or
model fails loudly instead of leaving stray attributes behind.
"""

from __future__ import annotations

from torch import Tensor

State = dict[str, Tensor | int]


def snapshot(tensors: dict[str, Tensor], counters: dict[str, int]) -> State:
    """Copies of ``tensors`` and the ``counters``, as one state dictionary."""
    return {**{k: v.detach().clone() for k, v in tensors.items()}, **counters}


def check_keys(owner: str, state: State, expected: set[str]) -> None:
    """Raise ValueError naming the missing and unknown keys unless ``state`` has exactly ``expected``."""
    missing, unknown = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unknown:
        raise ValueError(
            f"{owner}.load_state_dict: missing keys {missing}, unknown keys {unknown}; the state "
            "was saved by another algorithm (or averaging setting): resume with the same algorithm.*"
        )


def load_into(
    owner: str, state: State, tensors: dict[str, Tensor], counters: tuple[str, ...]
) -> dict[str, int]:
    """Copy ``state``'s tensors into ``tensors`` (in place, shapes checked); return its counters.

    Raises ValueError for missing or unknown keys, a shape mismatch or a non-integer counter,
    before anything is written.
    """
    check_keys(owner, state, set(tensors) | set(counters))
    for key, target in tensors.items():
        value = state[key]
        if not isinstance(value, Tensor) or value.shape != target.shape:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(
                f"{owner}.load_state_dict: {key!r} has shape {shape}, the role has "
                f"{tuple(target.shape)}; the state was saved for another model (model.*)"
            )
    values = {}
    for key in counters:
        value = state[key]
        if isinstance(value, (Tensor, bool)) or int(value) != value:
            raise ValueError(f"{owner}.load_state_dict: {key!r} must be an integer, got {value!r}")
        values[key] = int(value)
    for key, target in tensors.items():
        source = state[key]
        assert isinstance(source, Tensor)
        target.copy_(source)
    return values
