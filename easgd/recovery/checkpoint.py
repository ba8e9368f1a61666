"""Atomic, checksummed checkpoints; the newest good one is found even after a crash mid-write.

A checkpoint file holds ``{"format", "sha256", "payload"}`` where ``payload`` is the bytes of a
``torch.save`` of the state; the digest is checked before the payload is parsed, and both levels
are read with ``torch.load(weights_only=True)`` (tensors, numbers, strings, lists and dicts only:
no code runs), onto the CPU whatever device wrote them (``map_location``). Files are written with
:func:`easgd.recovery.files.atomic_write`, so a crash never leaves a half-written file under a
checkpoint's name. Files are numbered (the snapshot id); a worker also keeps one ``-final`` file,
its state when it said DONE.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from easgd.recovery.files import atomic_write

log = logging.getLogger("easgd.checkpoint")

FORMAT = "easgd-checkpoint-1"


class CheckpointError(ValueError):
    """A checkpoint cannot be used for this run; the message says why and what to do."""


class Checkpointer:
    """Checkpoints of one process (``name``: server, worker1, ...) in ``directory``."""

    def __init__(self, directory: str | os.PathLike[str], name: str, *, keep: int = 3) -> None:
        self.directory = Path(directory)
        self.name = name
        self.keep = keep
        self._pattern = re.compile(rf"^{re.escape(name)}-(\d+)\.pt$")

    def _existing(self) -> list[tuple[int, Path]]:
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.iterdir():
            match = self._pattern.match(path.name)
            if match:
                found.append((int(match.group(1)), path))
        return sorted(found)

    def path(self, number: int) -> Path:
        """Where checkpoint ``number`` of this process lives."""
        return self.directory / f"{self.name}-{number:08d}.pt"

    @property
    def final_path(self) -> Path:
        """Where this process's final state (written before a worker says DONE) lives."""
        return self.directory / f"{self.name}-final.pt"

    def numbers(self) -> list[int]:
        """The numbers of this process's checkpoint files, ascending."""
        return [number for number, _ in self._existing()]

    def save(self, state: dict[str, Any], number: int | None = None) -> Path:
        """Write ``state`` as checkpoint ``number`` (default: the next one), atomically.

        Without a number (unnumbered, sequential use) only the newest ``keep`` are kept; numbered
        snapshots are pruned by :meth:`prune`, since only the run knows which ones are committed.
        """
        existing = self._existing()
        if number is not None:
            return self._write(self.path(number), state)
        path = self._write(self.path(existing[-1][0] + 1 if existing else 0), state)
        for _, old in existing[: max(0, len(existing) + 1 - self.keep)]:
            old.unlink(missing_ok=True)
        return path

    def save_final(self, state: dict[str, Any]) -> Path:
        """Write this process's final state, atomically."""
        return self._write(self.final_path, state)

    @staticmethod
    def _write(path: Path, state: dict[str, Any]) -> Path:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        payload = buffer.getvalue()
        wrapper = {
            "format": FORMAT,
            "sha256": hashlib.sha256(payload).hexdigest(),
            "payload": payload,
        }
        out = io.BytesIO()
        torch.save(wrapper, out)
        return atomic_write(path, out.getvalue())

    def load(self, number: int) -> dict[str, Any] | None:
        """Checkpoint ``number`` (None if there is no such file; CheckpointError if damaged)."""
        path = self.path(number)
        return self.read(path) if path.is_file() else None

    def load_final(self) -> dict[str, Any] | None:
        """The final state (None if this process never finished)."""
        return self.read(self.final_path) if self.final_path.is_file() else None

    def prune(self, keep: Iterable[int]) -> None:
        """Delete every numbered checkpoint of this process below the smallest of ``keep``
        and not in it (newer, uncommitted ones stay: they may still be committed)."""
        kept = set(keep)
        if not kept:
            return
        for number, path in self._existing():
            if number < min(kept) or (number < max(kept) and number not in kept):
                path.unlink(missing_ok=True)

    @staticmethod
    def read(path: Path) -> dict[str, Any]:
        """Load and verify one checkpoint file (raises CheckpointError if it is not intact)."""
        try:
            wrapper = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as err:
            raise CheckpointError(f"{path} is unreadable ({type(err).__name__}: {err})") from None
        if not isinstance(wrapper, dict) or wrapper.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not an easgd checkpoint")
        payload = wrapper.get("payload")
        if not isinstance(payload, bytes) or hashlib.sha256(payload).hexdigest() != wrapper.get(
            "sha256"
        ):
            raise CheckpointError(f"{path} fails its checksum (corrupted)")
        state = torch.load(io.BytesIO(payload), weights_only=True, map_location="cpu")
        if not isinstance(state, dict):
            raise CheckpointError(f"{path} holds no state dictionary")
        return state

    def latest(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest intact checkpoint (skipping corrupt ones with a warning), or None."""
        for _, path in reversed(self._existing()):
            try:
                return path, self.read(path)
            except CheckpointError as err:
                log.warning("skipping checkpoint: %s; trying the previous one", err)
        return None


def check_compatible(state: dict[str, Any], *, path: Path, signature: dict[str, Any]) -> None:
    """Refuse a checkpoint written for another model or algorithm, naming both and the fix."""
    saved = state.get("signature", {})
    mismatched = {k: (saved.get(k), v) for k, v in signature.items() if saved.get(k) != v}
    if mismatched:
        details = ", ".join(
            f"{k}: checkpoint {a!r} vs this run {b!r}" for k, (a, b) in mismatched.items()
        )
        raise CheckpointError(
            f"{path} was written by a different run ({details}); use a fresh run directory "
            "(hydra.run.dir=...) or checkpoint.resume=false"
        )
