"""Compressed messages: the wire formats, their codec, error feedback and reference deltas.

Formats (``comm.compression``): ``none`` (float32), ``bf16``, ``fp16`` and ``int8`` (symmetric,
one float32 scale per block of :data:`INT8_BLOCK` values: scale = max|v| / 127 over the block,
q = round(v / scale)). A compressed message is a flat ``uint8`` tensor::

    [format code: int32][value count: int32] then per frame of FRAME_VALUES values:
    [int8 only: one float32 scale per block][values]

(one frame, the whole message, up to 2^20 values), so a message of another format or size is
refused on decode with one line that says which (:class:`WireError`), as the transport refuses a
payload of the wrong size. Each frame is encoded and decoded on its own, into buffers the ends
keep, which is what lets the exchange be pipelined (:mod:`easgd.engine.pipeline`).

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

FRAME_VALUES = 1 << 20
"""Values per frame (a multiple of :data:`INT8_BLOCK`): each frame is encoded, sent, received and
decoded on its own, so the pipelined exchange (:mod:`easgd.comm.pipeline`) overlaps one frame's
arithmetic with the next one's transfer. 4 MiB of float32: large enough that a message costs few
sends, small enough that a frame's scratch stays in the last-level cache."""

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


def _body_bytes(name: str, numel: int) -> int:
    if name == "int8":
        return 4 * _blocks(numel) + numel
    return numel * (2 if name in _HALF else 4)


def payload_bytes(name: str, numel: int) -> int:
    """Bytes of one message of ``numel`` values in format ``name``, prefix included."""
    check_format(name)
    return PREFIX_BYTES + _body_bytes(name, numel)


@dataclass(frozen=True)
class Frame:
    """One frame of a message: the values it carries and where its bytes lie in the message."""

    values: slice
    """Its values' range in the flat vector."""
    piece: slice
    """The bytes sent as one piece (frame 0's include the prefix)."""
    body: slice
    """The frame's encoded values (int8: its block scales, then its values)."""


def frames_of(name: str, numel: int) -> tuple[Frame, ...]:
    """The frames of a ``numel``-value message in format ``name`` (one when it fits in one)."""
    frames, offset = [], PREFIX_BYTES
    for start in range(0, max(numel, 1), FRAME_VALUES):
        stop = min(start + FRAME_VALUES, numel)
        size = _body_bytes(name, stop - start)
        piece = slice(0 if start == 0 else offset, offset + size)
        frames.append(Frame(slice(start, stop), piece, slice(offset, offset + size)))
        offset += size
    return tuple(frames)


class Codec:
    """Encodes float32 vectors of ``numel`` values in one format; decodes and checks messages.

    A message is the prefix, then one frame per :data:`FRAME_VALUES` values
    (:func:`frames_of`); a message of one frame is laid out as [prefix][int8: scales][values].
    Each frame's arithmetic is a few vectorised passes over that frame (a cast for bf16/fp16; for
    int8 one max-abs reduction per block, a divide, round and clamp, a cast), in the codec's own
    scratch: nothing is allocated per message once the caller passes ``out`` buffers. A codec is
    used by one thread at a time (each link owns its own).
    """

    def __init__(self, name: str, numel: int) -> None:
        self.name = check_format(name)
        self.numel = numel
        self.code = FORMATS.index(name)
        self.wire_bytes = payload_bytes(name, numel)
        self.frames = frames_of(name, numel)
        self.frame_values = max(f.values.stop - f.values.start for f in self.frames)
        """Values in the largest frame (the size of a frame's scratch)."""
        self._prefix = torch.tensor([self.code, numel], dtype=torch.int32).view(torch.uint8)
        self._scratch: Tensor | None = None

    def scratch(self) -> Tensor:
        """One frame of float32 work space (allocated on first use, then reused)."""
        if self._scratch is None:
            self._scratch = torch.empty(self.frame_values)
        return self._scratch

    def new_message(self) -> Tensor:
        """A message buffer (uint8) with this codec's prefix written."""
        wire = torch.empty(self.wire_bytes, dtype=torch.uint8)
        wire[:PREFIX_BYTES] = self._prefix
        return wire

    def encode(self, values: Tensor, out: Tensor | None = None) -> Tensor:
        """``values`` (``numel`` values, only read) as a message, into ``out`` when given (a
        :meth:`new_message` buffer), else a new one."""
        if values.numel() != self.numel:
            raise WireError(
                f"cannot encode {values.numel()} values: this link carries {self.numel}"
            )
        wire = self.new_message() if out is None else out
        flat = values.detach().reshape(-1)
        for index, frame in enumerate(self.frames):
            self.encode_frame(index, flat[frame.values], wire)
        return wire

    def encode_frame(self, index: int, values: Tensor, wire: Tensor) -> None:
        """Frame ``index`` of ``wire`` from its ``values`` (only read; any float dtype)."""
        body = wire[self.frames[index].body]
        if self.name == "int8":
            _encode_int8(values, body, self.scratch())
        elif self.name in _HALF:
            body.view(_HALF[self.name]).copy_(values)
        else:
            body.view(torch.float32).copy_(values)

    def check(self, wire: Tensor) -> None:
        """Refuse (:class:`WireError`) a message that is not this codec's format and size."""
        self.check_prefix(wire, wire.numel() if wire.dim() == 1 else -1)

    def check_prefix(self, wire: Tensor, total_bytes: int) -> None:
        """Refuse a message whose first bytes (``wire``, at least the prefix) say another format
        or size, or whose length ``total_bytes`` is not this codec's."""
        if wire.dtype != torch.uint8 or wire.dim() != 1 or wire.numel() < PREFIX_BYTES:
            raise WireError(
                f"a compressed message is a flat uint8 tensor, got {wire.dtype} {tuple(wire.shape)}"
            )
        code, numel = wire[:PREFIX_BYTES].view(torch.int32).tolist()
        if not 0 <= code < len(FORMATS) or code != self.code:
            got = FORMATS[code] if 0 <= code < len(FORMATS) else f"unknown code {code}"
            raise WireError(f"compressed message in format {got}, this link expects {self.name}")
        if numel != self.numel or total_bytes != self.wire_bytes:
            raise WireError(
                f"compressed {self.name} message of {numel} values in {total_bytes} bytes; "
                f"this link carries {self.numel} values in {self.wire_bytes} bytes"
            )

    def decode(self, wire: Tensor, out: Tensor | None = None) -> Tensor:
        """The float32 values of ``wire`` (checked first), into ``out`` when given."""
        self.check(wire)
        values = torch.empty(self.numel) if out is None else out
        flat = values.reshape(-1)
        for index, frame in enumerate(self.frames):
            self.decode_frame(index, wire, flat[frame.values])
        return values

    def decode_frame(self, index: int, wire: Tensor, out: Tensor) -> Tensor:
        """Frame ``index`` of ``wire`` (its prefix checked before) decoded into ``out``."""
        body = wire[self.frames[index].body]
        if self.name == "int8":
            return _decode_int8(body, out)
        return out.copy_(body.view(_HALF.get(self.name, torch.float32)))


def _encode_int8(values: Tensor, body: Tensor, scratch: Tensor) -> None:
    """[scales][int8 values] of one frame into ``body``: scale = max|v| / 127 per block."""
    numel = values.numel()
    blocks = _blocks(numel)
    scale = body[: 4 * blocks].view(torch.float32)
    quantized = body[4 * blocks :].view(torch.int8)
    work = scratch[:numel]
    torch.abs(values, out=work)
    full = numel // INT8_BLOCK
    if full:
        torch.amax(work[: full * INT8_BLOCK].view(full, INT8_BLOCK), dim=1, out=scale[:full])
    if full < blocks:  # the last, partial block
        scale[full:] = work[full * INT8_BLOCK :].amax()
    scale.div_(_INT8_MAX)
    # a zero block has scale 0: send q = 0; a non-finite block has a non-finite scale and
    # decodes to NaN (0 * nan or q * nan), so the server's guard still sees the divergence
    finite = bool(torch.isfinite(scale).all())
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)) if finite else scale.nan_to_num()
    safe[safe == 0] = 1.0
    if full:
        grid = values[: full * INT8_BLOCK].view(full, INT8_BLOCK)
        torch.div(grid, safe[:full, None], out=work[: full * INT8_BLOCK].view(full, INT8_BLOCK))
    if full < blocks:
        torch.div(values[full * INT8_BLOCK :], safe[full:], out=work[full * INT8_BLOCK :])
    work.round_().clamp_(-_INT8_MAX, _INT8_MAX)
    if not finite:
        work.nan_to_num_(nan=0.0)
    quantized.copy_(work)


def _decode_int8(body: Tensor, out: Tensor) -> Tensor:
    numel = out.numel()
    blocks = _blocks(numel)
    scale = body[: 4 * blocks].view(torch.float32)
    quantized = body[4 * blocks :].view(torch.int8)
    full = numel // INT8_BLOCK
    if full:
        grid = out[: full * INT8_BLOCK].view(full, INT8_BLOCK)
        torch.mul(
            quantized[: full * INT8_BLOCK].view(full, INT8_BLOCK), scale[:full, None], out=grid
        )
    if full < blocks:
        torch.mul(quantized[full * INT8_BLOCK :], scale[full:], out=out[full * INT8_BLOCK :])
    return out


class IncrementSender:
    """Sends increments (values the receiver adds once), with optional error feedback.

    With ``error_feedback`` the residual r (true minus decoded, 4 bytes per parameter) is added
    to the next message: after k messages sum(decoded) = sum(true) - r_k. The message buffer
    (:attr:`wire`) is the sender's own and is rewritten by the next message.
    """

    def __init__(self, codec: Codec, *, error_feedback: bool) -> None:
        self.codec = codec
        self.residual: Tensor | None = (
            torch.zeros(codec.numel, dtype=torch.float32) if error_feedback else None
        )
        self.wire = codec.new_message()
        self._decoded: Tensor | None = None

    def encode(self, values: Tensor, decoded: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(message, decoded): ``decoded`` is exactly what the receiver will decode, written into
        the ``decoded`` given (which may be ``values`` itself) or a buffer the next call reuses."""
        if decoded is None:
            if self._decoded is None:
                self._decoded = torch.empty(self.codec.numel)
            decoded = self._decoded
        flat, out = values.detach().reshape(-1).cpu(), decoded.view(-1)
        for index, frame in enumerate(self.codec.frames):
            self.encode_frame(index, flat[frame.values], out[frame.values])
        return self.wire, decoded

    def encode_frame(self, index: int, values: Tensor, decoded: Tensor) -> None:
        """Frame ``index`` of :attr:`wire` from ``values``; ``decoded`` (may be ``values``) gets
        what the receiver will decode of it."""
        if values.dtype != torch.float32:
            values = values.to(torch.float32)  # rounded once, as the float32 sender would
        if self.residual is None:
            self.codec.encode_frame(index, values, self.wire)
        else:
            target = self.residual[self.codec.frames[index].values].add_(values)
            self.codec.encode_frame(index, target, self.wire)
        self.codec.decode_frame(index, self.wire, decoded)
        if self.residual is not None:
            target.sub_(decoded)  # r = target - decoded, exact (Sterbenz)


class DeltaSender:
    """Sends a state as the delta against a reference both ends hold (``reference``, float32)."""

    def __init__(self, codec: Codec, reference: Tensor) -> None:
        self.codec = codec
        self.reference = reference.detach().reshape(-1).to(torch.float32, copy=True).cpu()
        self.wire = codec.new_message()
        self._delta = torch.empty(codec.frame_values)

    def encode(self, value: Tensor) -> Tensor:
        """The message for ``value``; the reference moves by the decoded delta (as the receiver's).
        The message buffer is the sender's own, rewritten by the next message."""
        flat = value.detach().reshape(-1).cpu()
        for index, frame in enumerate(self.codec.frames):
            self.encode_frame(index, flat[frame.values])
        return self.wire

    def encode_frame(self, index: int, value: Tensor) -> None:
        """Frame ``index`` of :attr:`wire` for ``value`` (that frame's values)."""
        reference = self.reference[self.codec.frames[index].values]
        delta = torch.sub(value, reference, out=self._delta[: reference.numel()])
        self.codec.encode_frame(index, delta, self.wire)
        reference.add_(self.codec.decode_frame(index, self.wire, delta))


class DeltaReceiver:
    """The receiving end of a :class:`DeltaSender`: the reference, moved by each decoded delta."""

    def __init__(self, codec: Codec, reference: Tensor) -> None:
        self.codec = codec
        self.reference = reference.detach().reshape(-1).to(torch.float32, copy=True).cpu()
        self._delta = torch.empty(codec.frame_values)

    def decode(self, wire: Tensor) -> Tensor:
        """The sender's value as this end knows it (the live reference: copy to keep it)."""
        self.codec.check(wire)
        for index in range(len(self.codec.frames)):
            self.decode_frame(index, wire)
        return self.reference

    def decode_frame(self, index: int, wire: Tensor) -> Tensor:
        """Move frame ``index`` of the reference by ``wire``'s (prefix checked before); returns
        that frame of the reference."""
        reference = self.reference[self.codec.frames[index].values]
        delta = self._delta[: reference.numel()]
        return reference.add_(self.codec.decode_frame(index, wire, delta))


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
    """A worker's end: ``send`` encodes its payload, ``receive`` decodes the reply (whole, or
    frame by frame for the pipelined exchange: :attr:`message`, ``*_frame``)."""

    def __init__(self, compression: Compression, start: Tensor) -> None:
        codec = compression.codec()
        self.elastic = compression.elastic
        self.codec = codec
        if self.elastic:
            self.up_state = DeltaSender(codec, start)
            self.message = self.up_state.wire
        else:
            self.up_increment = IncrementSender(codec, error_feedback=compression.error_feedback)
            self.down_state = DeltaReceiver(codec, start)
            self.message = self.up_increment.wire
            self._scratch = torch.empty(codec.frame_values)
        self._reply = torch.empty(codec.numel, dtype=torch.float32)

    def send(self, payload: Tensor | None) -> Tensor | None:
        """The message for the role's ``outgoing()`` (None stays None; the buffer is
        :attr:`message`, rewritten by the next send)."""
        if payload is None:
            return None
        flat = payload.detach().reshape(-1).cpu()
        for index, frame in enumerate(self.codec.frames):
            self.encode_frame(index, flat[frame.values])
        return self.message

    def encode_frame(self, index: int, payload: Tensor) -> None:
        """Frame ``index`` of :attr:`message` from that frame of the payload."""
        if self.elastic:
            self.up_state.encode_frame(index, payload)
        else:
            decoded = self._scratch[: payload.numel()]
            self.up_increment.encode_frame(index, payload, decoded)

    def receive(self, wire: Tensor) -> Tensor:
        """The reply the role applies (valid until the next receive)."""
        self.codec.check(wire)
        for index in range(len(self.codec.frames)):
            self.decode_frame(index, wire)
        return self.reply()

    def decode_frame(self, index: int, wire: Tensor) -> None:
        """Frame ``index`` of the reply ``wire`` (its prefix checked before)."""
        if not self.elastic:
            self.down_state.decode_frame(index, wire)
            return
        part = self.codec.frames[index].values
        diff = self.codec.decode_frame(index, wire, self._reply[part])
        self.up_state.reference[part].sub_(diff)  # the server moves its x^_i by the same e^

    def reply(self) -> Tensor:
        """The decoded reply (elastic: e^; else the center as this worker now holds it)."""
        return self._reply if self.elastic else self.down_state.reference
