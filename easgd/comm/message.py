"""The messages between a worker and the server: a small float64 header, then an optional payload.

The header is one float64 slot per field of :class:`Header`, in field order (float64 holds every
integer up to 2**53 exactly). Each field has one meaning; a field a message does not use is 0.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


class Op(enum.IntEnum):
    """Message kinds."""

    HELLO = 1
    """worker -> server: my parameter count; reply: the initial center (or the resumed state)."""
    EXCHANGE = 2
    """worker -> server: this algorithm's payload; reply: the server role's answer."""
    DONE = 3
    """worker -> server: finished (with a last payload for MDOWNPOUR); reply: acknowledgement."""
    REPLY = 4
    """server -> worker: the answer to one message."""
    FAILED = 5
    """worker -> server: I raised an exception at ``step`` and am leaving."""


class ServerRejected(RuntimeError):
    """The server refused a worker's message (e.g. a parameter-count mismatch)."""


class ServerFailed(RuntimeError):
    """The server raised an exception and ended the run; its log holds the traceback."""


ERROR_SHAPE_MISMATCH = 1
"""HELLO refused: the worker's model has another parameter count (in ``num_params``)."""
ERROR_NON_FINITE = 2
"""EXCHANGE refused by the divergence guard: the payload is the center, reset to it."""
ERROR_SERVER = 3
"""The server failed (an exception in the server, not the worker's fault); the run is over."""
ERROR_FORMAT_MISMATCH = 4
"""HELLO refused: the worker compresses with another ``comm.compression`` (the server's in
``compression``)."""


@dataclass
class Header:
    """Decoded header fields (one float64 slot each, in this order)."""

    op: Op
    step: int = 0
    """The sender's step counter (worker t_i; on a reply, the server's exchange count)."""
    has_payload: bool = False
    """1 if a payload tensor follows."""
    stop: bool = False
    """server -> worker: stop after this step."""
    error: int = 0
    """server -> worker: nonzero (an ``ERROR_*`` code) when the server refused or failed."""
    train_loss: float = 0.0
    """EXCHANGE: the worker's mean train loss since its previous exchange."""
    latency_ms: float = 0.0
    """EXCHANGE: round-trip time of the worker's previous exchange."""
    staleness: int = 0
    """REPLY: server updates since this worker last read the center."""
    num_params: int = 0
    """HELLO (and its refusal): the sender's parameter count."""
    steps_per_s: float = 0.0
    """DONE: the worker's step rate over its loop."""
    snapshot: int = 0
    """REPLY: this exchange is the worker's part of snapshot ``snapshot`` (0: none): save it."""
    saved_snapshot: int = 0
    """worker -> server: the newest snapshot this worker has durably saved (0: none)."""
    redone_steps: int = 0
    """HELLO: steps this worker computed before the last crash and must now compute again."""
    member: int = 0
    """HELLO (workers that come and go): which member of its slot the sender is, numbered from 1
    in the order they first joined; a rejoining member keeps its number."""
    ledger: bool = False
    """HELLO: a member rejoining a restarted server; its float64 ledger (the center changes its
    exchanges caused) follows as a second message (workers that come and go)."""
    compression: int = 0
    """The payload's wire format (index in easgd.comm.compression.FORMATS; 0: float32); on a
    HELLO, the format the worker is configured with (the server refuses another)."""

    def encode(self) -> Tensor:
        """As the float64 tensor that travels."""
        return torch.tensor(
            [float(getattr(self, f.name)) for f in dataclasses.fields(self)], dtype=torch.float64
        )

    @classmethod
    def decode(cls, tensor: Tensor) -> Header:
        """From the received float64 tensor."""
        values = tensor.tolist()
        kwargs: dict[str, Any] = {}
        for f, value in zip(_FIELDS, values, strict=True):
            kind = _TYPES[f.name]
            kwargs[f.name] = Op(int(value)) if f.name == "op" else kind(value)
        return cls(**kwargs)


_FIELDS = dataclasses.fields(Header)
_TYPES = {
    f.name: {"int": int, "bool": bool, "float": float, "Op": Op}[str(f.type)] for f in _FIELDS
}
HEADER_SIZE = len(_FIELDS)
