"""The messages between a worker and the server: a small float64 header, then an optional payload.

Header slots (float64 holds every integer up to 2**53 exactly):

    0 op            what the message is (see :class:`Op`)
    1 step          the sender's step counter (worker t_i, or the server clock)
    2 has_payload   1 if a payload tensor follows
    3 stop          server -> worker: stop after this step
    4 value         op-specific number (HELLO: parameter count; EXCHANGE: mean train loss)
    5 latency_ms    worker -> server: round-trip time of its previous exchange
    6 staleness     server -> worker: server updates since this worker last read the center
    7 error         server -> worker: nonzero when the server rejected the message
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
from torch import Tensor

HEADER_SIZE = 8


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
    """worker -> server: I raised an exception and am leaving (continue-policy bookkeeping)."""


class ServerRejected(RuntimeError):
    """The server refused a worker's message (e.g. a parameter-count mismatch)."""


ERROR_SHAPE_MISMATCH = 1
ERROR_NON_FINITE = 2


@dataclass
class Header:
    """Decoded header fields."""

    op: Op
    step: int = 0
    has_payload: bool = False
    stop: bool = False
    value: float = 0.0
    latency_ms: float = 0.0
    staleness: int = 0
    error: int = 0

    def encode(self) -> Tensor:
        """As the float64 tensor that travels."""
        return torch.tensor(
            [
                float(self.op),
                float(self.step),
                float(self.has_payload),
                float(self.stop),
                float(self.value),
                float(self.latency_ms),
                float(self.staleness),
                float(self.error),
            ],
            dtype=torch.float64,
        )

    @classmethod
    def decode(cls, tensor: Tensor) -> Header:
        """From the received float64 tensor."""
        v = tensor.tolist()
        return cls(
            op=Op(int(v[0])),
            step=int(v[1]),
            has_payload=bool(v[2]),
            stop=bool(v[3]),
            value=float(v[4]),
            latency_ms=float(v[5]),
            staleness=int(v[6]),
            error=int(v[7]),
        )
