"""Compressed messages: the wire formats, their codec, error feedback and reference deltas.

Formats (``comm.compression``): ``none`` (float32), ``bf16``, ``fp16`` and ``int8`` (symmetric,
one float32 scale per block of :data:`INT8_BLOCK` values: scale = max|v| / 127 over the block,
q = round(v / scale)). A compressed message is a flat ``uint8`` tensor::

    [format code: int32][value count: int32][int8 only: one float32 scale per block][values]

so a message of another format or size is refused on decode with one line that says which
(:class:`WireError`), as the transport refuses a payload of the wrong size.

Bytes per parameter on the wire: none 4, bf16 and fp16 2, int8 1 + 4/256 = 1.016 (plus the
8-byte prefix per message). Block size 256: the scale costs 1.6% of the int8 bytes, and a block
is small enough that one large value (a bias, an outlier weight) costs resolution to only 255
neighbours. fp16 overflows to inf above 65504 (a difference that large means divergence, which
the server's guard refuses); bf16 keeps float32's range with 8 bits of mantissa.

What is quantized is always a difference, never a parameter (rounding x to bf16 errs by about
|x| 2^-9, more than the elastic move alpha (x - center) near convergence). Two kinds of message:

- an *increment* (an elastic difference, a DOWNPOUR accumulation, a gradient) is sent by an
  :class:`IncrementSender`; with error feedback it keeps the residual r = (value + r) - decoded
  and adds it to the next message, so after k messages sum(decoded) = sum(true) - r_k;
- a *state* both ends track (a worker's parameters as the server knows them, the center as a
  worker last received it) is sent as the delta against a shared reference
  (:class:`DeltaSender` / :class:`DeltaReceiver`); both ends add the same decoded delta, so the
  references stay bit-identical and the next delta carries this one's error: error feedback is
  built in (the residual is the sender's value minus the reference).

All-reduce (``topology=allreduce``) is not compressed: a collective sums in the wire dtype, so
bf16/fp16 would ride it but the sum would be rounded to 8 (11) bits, and the center would no
longer move by exactly what the workers moved (conservation to bf16, not float32, precision);
int8's per-rank block scales cannot be summed by an all-reduce at all. Both would need an
all-gather of the messages (p times the bytes received) and a float32 sum on every rank.

Pure tensors, no ``torch.distributed``: the roles' links (:mod:`easgd.roles.links`) compose them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

FORMATS = ("none", "bf16", "fp16", "int8")
"""Allowed values of ``comm.compression``."""

INT8_BLOCK = 256
"""Values per int8 scale."""

PREFIX_BYTES = 8
"""Format code (int32) and value count (int32) at the head of every compressed message."""

_HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
_INT8_MAX = 127.0


class WireError(ValueError):
    """A compressed message of the wrong format or size."""


def check_format(name: str) -> str:
    """``name`` if it is a known format, else a ValueError naming the key and the choices."""
    if name not in FORMATS:
        raise ValueError(f"comm.compression={name!r}; allowed: {', '.join(FORMATS)}")
    return name


def _blocks(numel: int) -> int:
    return -(-numel // INT8_BLOCK)


def payload_bytes(name: str, numel: int) -> int:
    """Bytes of one message of ``numel`` values in format ``name``, prefix included."""
    check_format(name)
    if name == "int8":
        return PREFIX_BYTES + 4 * _blocks(numel) + numel
    return PREFIX_BYTES + numel * (2 if name in _HALF else 4)


class Codec:
    """Encodes float32 vectors of ``numel`` values in one format; decodes and checks messages."""

    def __init__(self, name: str, numel: int) -> None:
        self.name = check_format(name)
        self.numel = numel
        self.code = FORMATS.index(name)
        self.wire_bytes = payload_bytes(name, numel)
        self._prefix = torch.tensor([self.code, numel], dtype=torch.int32).view(torch.uint8)

    def encode(self, values: Tensor) -> Tensor:
        """``values`` (``numel`` float32, only read) as a new uint8 message."""
        if values.numel() != self.numel:
            raise WireError(
                f"cannot encode {values.numel()} values: this link carries {self.numel}"
            )
        flat = values.detach().reshape(-1).to(torch.float32)
        if self.name == "int8":
            body = _encode_int8(flat)
        elif self.name in _HALF:
            body = flat.to(_HALF[self.name]).view(torch.uint8)
        else:
            body = flat.contiguous().view(torch.uint8)
        return torch.cat([self._prefix, body.cpu()])

    def check(self, wire: Tensor) -> None:
        """Refuse (:class:`WireError`) a message that is not this codec's format and size."""
        if wire.dtype != torch.uint8 or wire.dim() != 1 or wire.numel() < PREFIX_BYTES:
            raise WireError(
                f"a compressed message is a flat uint8 tensor, got {wire.dtype} {tuple(wire.shape)}"
            )
        code, numel = wire[:PREFIX_BYTES].view(torch.int32).tolist()
        if not 0 <= code < len(FORMATS) or code != self.code:
            got = FORMATS[code] if 0 <= code < len(FORMATS) else f"unknown code {code}"
            raise WireError(f"compressed message in format {got}, this link expects {self.name}")
        if numel != self.numel or wire.numel() != self.wire_bytes:
            raise WireError(
                f"compressed {self.name} message of {numel} values in {wire.numel()} bytes; "
                f"this link carries {self.numel} values in {self.wire_bytes} bytes"
            )

    def decode(self, wire: Tensor, out: Tensor | None = None) -> Tensor:
        """The float32 values of ``wire`` (checked first), into ``out`` when given."""
        self.check(wire)
        body = wire[PREFIX_BYTES:]
        if self.name == "int8":
            values = _decode_int8(body, self.numel)
        elif self.name in _HALF:
            values = body.view(_HALF[self.name]).to(torch.float32)
        else:
            values = body.view(torch.float32)
        if out is None:
            return values.clone() if self.name == "none" else values
        return out.copy_(values)


def _encode_int8(flat: Tensor) -> Tensor:
    numel = flat.numel()
    blocks = _blocks(numel)
    padded = torch.zeros(blocks * INT8_BLOCK, dtype=torch.float32, device=flat.device)
    padded[:numel] = flat
    grid = padded.view(blocks, INT8_BLOCK)
    scale = grid.abs().amax(dim=1) / _INT8_MAX
    # a zero block has scale 0: send q = 0; a non-finite block has a non-finite scale and
    # decodes to NaN (0 * nan), so the server's guard still sees the divergence
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    quantized = torch.round(grid / safe[:, None]).clamp_(-_INT8_MAX, _INT8_MAX)
    quantized = torch.nan_to_num(quantized, nan=0.0)
    body = quantized.to(torch.int8).reshape(-1)[:numel]
    return torch.cat([scale.view(torch.uint8), body.view(torch.uint8)])


def _decode_int8(body: Tensor, numel: int) -> Tensor:
    blocks = _blocks(numel)
    scale = body[: 4 * blocks].view(torch.float32)
    quantized = body[4 * blocks :].view(torch.int8).to(torch.float32)
    padded = torch.zeros(blocks * INT8_BLOCK, dtype=torch.float32)
    padded[:numel] = quantized
    return (padded.view(blocks, INT8_BLOCK) * scale[:, None]).reshape(-1)[:numel]


class IncrementSender:
    """Sends increments (values the receiver adds once), with optional error feedback.

    With ``error_feedback`` the residual r (true minus decoded, 4 bytes per parameter) is added
    to the next message: after k messages sum(decoded) = sum(true) - r_k.
    """

    def __init__(self, codec: Codec, *, error_feedback: bool) -> None:
        self.codec = codec
        self.residual: Tensor | None = (
            torch.zeros(codec.numel, dtype=torch.float32) if error_feedback else None
        )

    def encode(self, values: Tensor) -> tuple[Tensor, Tensor]:
        """(message, decoded): ``decoded`` is exactly what the receiver will decode."""
        flat = values.detach().reshape(-1).to(torch.float32)
        target = flat if self.residual is None else flat.cpu() + self.residual
        wire = self.codec.encode(target)
        decoded = self.codec.decode(wire)
        if self.residual is not None:
            torch.sub(target, decoded, out=self.residual)
        return wire, decoded


class DeltaSender:
    """Sends a state as the delta against a reference both ends hold (``reference``, float32)."""

    def __init__(self, codec: Codec, reference: Tensor) -> None:
        self.codec = codec
        self.reference = reference.detach().reshape(-1).to(torch.float32, copy=True).cpu()

    def encode(self, value: Tensor) -> Tensor:
        """The message for ``value``; the reference moves by the decoded delta (as the receiver's)."""
        wire = self.codec.encode(value.detach().reshape(-1).cpu() - self.reference)
        self.reference.add_(self.codec.decode(wire))
        return wire


class DeltaReceiver:
    """The receiving end of a :class:`DeltaSender`: the reference, moved by each decoded delta."""

    def __init__(self, codec: Codec, reference: Tensor) -> None:
        self.codec = codec
        self.reference = reference.detach().reshape(-1).to(torch.float32, copy=True).cpu()

    def decode(self, wire: Tensor) -> Tensor:
        """The sender's value as this end knows it (the live reference: copy to keep it)."""
        self.reference.add_(self.codec.decode(wire))
        return self.reference


@dataclass(frozen=True)
class Compression:
    """``comm.compression`` and ``comm.error_feedback`` for one rule over ``numel`` values."""

    name: str
    error_feedback: bool
    elastic: bool
    """True: up is a state (x_i), down an increment (e); False: up an increment, down a state."""
    numel: int

    def __post_init__(self) -> None:
        check_format(self.name)

    def codec(self) -> Codec:
        """A codec of this format and size."""
        return Codec(self.name, self.numel)

    def worker_link(self, start: Tensor) -> WorkerLink:
        """Worker end, both references at ``start`` (the handshake's center)."""
        return WorkerLink(self, start)


class WorkerLink:
    """A worker's end: ``send`` encodes its payload, ``receive`` decodes the reply."""

    def __init__(self, compression: Compression, start: Tensor) -> None:
        codec = compression.codec()
        self.elastic = compression.elastic
        self.codec = codec
        if self.elastic:
            self.up_state = DeltaSender(codec, start)
        else:
            self.up_increment = IncrementSender(codec, error_feedback=compression.error_feedback)
            self.down_state = DeltaReceiver(codec, start)
        self._reply = torch.empty(codec.numel, dtype=torch.float32)

    def send(self, payload: Tensor | None) -> Tensor | None:
        """The message for the role's ``outgoing()`` (None stays None)."""
        if payload is None:
            return None
        if self.elastic:
            return self.up_state.encode(payload)
        return self.up_increment.encode(payload)[0]

    def receive(self, wire: Tensor) -> Tensor:
        """The reply the role applies (valid until the next receive)."""
        if not self.elastic:
            return self.down_state.decode(wire)
        diff = self.codec.decode(wire, out=self._reply)
        self.up_state.reference.sub_(diff)  # the server moves its x^_i by the same e^
        return diff
