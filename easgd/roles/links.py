"""Compressed exchanges: the one place each direction of a worker <-> server message is encoded.

A :class:`WorkerLink` (:mod:`easgd.comm.compression`) sits between a worker role and the server:
``send`` encodes the role's ``outgoing()``, ``receive`` decodes the reply for ``incoming()``; the
worker's :class:`easgd.comm.transport.CompressedTransport` holds it. A :class:`ServerLink` per
worker sits around the server role (``decode``; ``apply``: the role's rule, then encode), held by
:class:`easgd.engine.server.ParameterServer` (and the simulator). With ``comm.compression=none``
no link is built and messages travel as float32, as before.

What each rule quantizes (always a difference; :mod:`easgd.comm.compression`):

- elastic (EASGD, EAMSGD): up, x_i as the delta against x^_i, the worker's parameters as the
  server last knew them (both ends hold x^_i; the delta is the tau local steps since the last
  exchange plus the previous rounding, so error feedback is built in). The server computes
  e = alpha (x^_i - center) and quantizes e (error feedback optional) *before* applying it:
  center += e^ and x_i -= e^ with the same decoded bits, so center + sum_i x_i is conserved to
  float rounding with every format. Both ends then move x^_i by -e^.
- DOWNPOUR family and MDOWNPOUR: up, the accumulation a_i (or the gradient) as an increment
  (error feedback optional, on the worker); down, the center (MDOWNPOUR: the look-ahead) as the
  delta against what this worker last received.

Server memory per worker, in bytes per model parameter (float32), held for the whole run:
elastic 4 (x^_i) + 4 (the reply buffer) + 4 with error feedback (the residual of e), DOWNPOUR and
MDOWNPOUR 4 (the center this worker last received) + 4 (the reply buffer); plus two compressed
messages, the transport's receive buffer and the reply's own buffer (each int8 1.016, bf16/fp16
2), and a few frames of scratch (a frame is 2^20 values: 4 MiB each, whatever the model's size).
The float32 exchange holds 4 (one receive buffer that the reply reuses), so compression adds 10.0
(elastic with error feedback) or 6.0 (otherwise) with int8 (tested: ``tests/test_compression.py``).
A worker holds 4 (its reference) + 4 (reply) + 4 with error feedback (DOWNPOUR's residual), plus
its two messages. The references start from
the center of the handshake (a resumed worker's first delta is then large, and the next one
corrects its rounding); residuals are not checkpointed (a restart drops at most one message's
rounding).
"""

from __future__ import annotations

import torch
from torch import Tensor

from easgd.comm.compression import (
    Compression,
    DeltaReceiver,
    DeltaSender,
    IncrementSender,
    WorkerLink,
)
from easgd.config.algorithm import AlgorithmConfig
from easgd.roles.server import ElasticServer, ServerRole

__all__ = ["Compression", "ServerLink", "WorkerLink", "compression_of"]


def compression_of(
    config: AlgorithmConfig, name: str, error_feedback: bool, numel: int
) -> Compression:
    """The compression of ``config``'s rule (``name`` none still builds one, for tests)."""
    return Compression(name, error_feedback, config.spec.elastic, numel)


class ServerLink:
    """The server's end for one worker: decode, the role's rule, encode the reply."""

    def __init__(self, compression: Compression, start: Tensor) -> None:
        codec = compression.codec()
        self.elastic = compression.elastic
        self.codec = codec
        if self.elastic:
            self.up_state = DeltaReceiver(codec, start)
            self.down_increment = IncrementSender(codec, error_feedback=compression.error_feedback)
        else:
            self.down_state = DeltaSender(codec, start)
        self._reply = torch.empty(codec.numel, dtype=start.dtype)
        self._sent: Tensor | None = None

    def decode(self, wire: Tensor | None) -> Tensor | None:
        """The payload as the role reads it (elastic: x^_i, live; else the decoded increment)."""
        if wire is None:
            return None
        return self.up_state.decode(wire) if self.elastic else self.codec.decode(wire)

    def _quantize(self, diff: Tensor) -> None:
        self._sent, _ = self.down_increment.encode(diff, decoded=diff)

    @property
    def decoded_reply(self) -> Tensor:
        """The last reply as the worker decodes it (elastic: e^; else the center it will hold)."""
        return self._reply if self.elastic else self.down_state.reference

    def apply(
        self,
        role: ServerRole,
        worker: int,
        payload: Tensor | None,
        *,
        max_update_norm: float | None = None,
    ) -> Tensor:
        """The role's rule on a decoded payload (:meth:`decode`); the compressed reply."""
        if not self.elastic:
            reply = role.handle(worker, payload, out=self._reply, max_update_norm=max_update_norm)
            return self.down_state.encode(reply)
        if payload is None:
            raise ValueError(f"worker {worker} sent no parameters to an elastic exchange")
        if not isinstance(role, ElasticServer):
            raise ValueError(f"{type(role).__name__} replies a state, not an elastic difference")
        diff = role.handle_quantized(
            worker, payload, self._quantize, out=self._reply, max_update_norm=max_update_norm
        )
        self.up_state.reference.sub_(diff)
        sent, self._sent = self._sent, None
        assert sent is not None
        return sent

    # -- the elastic exchange frame by frame (the pipelined exchange: easgd.engine.server) -------
    @property
    def message(self) -> Tensor:
        """The buffer of the compressed reply (elastic: e^, written by :meth:`apply_frame`)."""
        return self.down_increment.wire

    def decode_frame(self, index: int, wire: Tensor) -> None:
        """Frame ``index`` of the worker's message (its prefix checked before): x^_i moves by
        the decoded delta (this link's own state: no lock needed)."""
        self.up_state.decode_frame(index, wire)

    def difference_frame(self, role: ElasticServer, index: int) -> float:
        """e = alpha (x^_i - center) for frame ``index`` into the reply; returns ||e||^2 there."""
        part = self.codec.frames[index].values
        return role.difference_part(self._reply[part], self.up_state.reference[part], part)

    def apply_frame(self, role: ElasticServer, index: int) -> None:
        """Frame ``index`` of the reply: e quantized to e^ (error feedback as configured), the
        center moved by e^ and x^_i by -e^, the same bits the worker will apply."""
        part = self.codec.frames[index].values
        diff = self._reply[part]
        self.down_increment.encode_frame(index, diff, diff)
        role.apply_part(diff, part)
        self.up_state.reference[part].sub_(diff)

    def handle(
        self,
        role: ServerRole,
        worker: int,
        wire: Tensor | None,
        *,
        max_update_norm: float | None = None,
    ) -> Tensor:
        """Apply one compressed message with ``role`` and return the compressed reply."""
        payload = self.decode(wire)
        return self.apply(role, worker, payload, max_update_norm=max_update_norm)
