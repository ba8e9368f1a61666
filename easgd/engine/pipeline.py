"""The parameter server's pipelined elastic exchange: work on one piece while another travels.

A large payload travels as pieces of 2^20 values (:data:`easgd.comm.transport.PIECE_VALUES`; a
compressed message's frames), every receive posted at once. The server:

1. as each piece arrives, outside the lock (a worker that stops mid-message must not hold up the
   others): a compressed frame is decoded into x^_i while the next one is on the wire;
2. under the lock, writes e = alpha (x_i - center) and ||e|| part by part and judges the whole
   update as the eager exchange does (non-finite or over ``max_update_norm``: refused, the
   center untouched, the worker reset to the center). Float32 without a norm limit judges as
   the whole-message exchange does instead: each piece's sum, read as it lands, reveals a
   non-finite value, and step 3 computes e and moves the center in one (compiled) pass per part;
3. sends the reply's header, then for each part moves the center by e (compressed: quantizes e
   to e^ first, with error feedback, and moves the center and x^_i by e^) and starts sending that
   piece of the reply: the update of piece k+1 overlaps the transfer of piece k, and the worker
   decodes piece k while the server still works on later ones.

The operations, and their order per value, are those of :meth:`ElasticServer.handle` with a
norm limit (e first, its norm checked, then center += e), so the result is bit for bit the same
(tested). The reply is written into the worker's own receive buffer (float32) or its link's
(compressed), as before. Used for elastic roles (EASGD, EAMSGD) on unframed links
(more than :data:`easgd.comm.transport.FRAME_LIMIT` values) when no ``before_update`` hook
needs the whole payload first; every other message goes the eager way.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from easgd.comm.compression import WireError
from easgd.comm.message import Header, Op
from easgd.comm.transport import Incoming, PairTransport
from easgd.roles import ElasticServer

if TYPE_CHECKING:
    from easgd.engine.server import ParameterServer


def pipelines(server: ParameterServer, transport: PairTransport) -> bool:
    """Whether ``server``'s exchanges on ``transport`` take the pipelined path."""
    return (
        isinstance(server.role, ElasticServer)
        and not getattr(transport, "framed", True)  # test doubles may not say: whole messages
        and not server.before_update
        and server.pipeline
    )


def _lost(err: BaseException) -> Exception:
    from easgd.engine.server import PeerLost

    return PeerLost(f"{type(err).__name__}: {err}")


def exchange(
    server: ParameterServer, rank: int, transport: PairTransport, header: Header, incoming: Incoming
) -> None:
    """Serve one EXCHANGE whose payload is arriving as ``incoming`` (see the module)."""
    role = server.role
    assert isinstance(role, ElasticServer)
    stats, link, limit = server.stats[rank], server.links.get(rank), server.policy.max_update_norm
    payload = incoming.buffer if link is None else link.up_state.reference
    # float32 without a norm limit: as the whole-message exchange, each piece's sum reveals a
    # non-finite value (read as it lands), then one pass per part computes e and moves the center
    one_pass, finite = link is None and limit is None, True
    for index in range(len(incoming.pieces)):
        try:
            arrived = incoming.wait(index)
            if one_pass:
                finite = finite and math.isfinite(float(arrived.sum()))
            if link is not None:
                if index == 0:
                    link.codec.check_prefix(arrived, incoming.buffer.numel())
                link.decode_frame(index, incoming.buffer)
        except (WireError, RuntimeError) as err:  # a broken link, a wrong message
            raise _lost(err) from err
    with server.lock:
        mark = server.snapshots.on_message(rank, header) if server.snapshots is not None else 0
        staleness = role.updates - stats.last_read
        squares = 0.0 if finite else math.inf
        for index, piece in enumerate(incoming.pieces):
            if one_pass:
                break
            if link is None:
                squares += role.difference_part(payload[piece], payload[piece], piece)
            else:
                squares += link.difference_frame(role, index)
        norm = math.sqrt(squares)
        refusal = None
        if not math.isfinite(norm):
            refusal = "non-finite values"
        elif limit is not None and norm > limit:
            refusal = f"update norm {norm:.3g} > max_update_norm {limit:g}"
        if refusal is not None:
            reply = role.reply_center(out=payload)
            stats.last_read = role.updates
            server._restart_link(rank, transport, reply)
        else:
            server.exchanges += 1
            stats.last_read = role.updates + 1
            reply_header = Header(
                Op.REPLY,
                step=server.exchanges,
                staleness=staleness,
                stop=server.stop.is_set(),
                snapshot=mark,
            )
            message = incoming.buffer if link is None else link.message
            outgoing, broken = None, None
            try:
                outgoing = transport.outgoing(reply_header, message)
            except RuntimeError as err:
                broken = err
            for index, piece in enumerate(incoming.pieces):
                if one_pass:
                    role.update_part(payload[piece], piece)
                elif link is None:
                    role.apply_part(payload[piece], piece)
                else:
                    link.apply_frame(role, index)
                if outgoing is not None and broken is None:
                    try:
                        outgoing.send(index)
                    except RuntimeError as err:  # the update completes all the same
                        broken = err
            role.count_update()
    if refusal is not None:
        server._refused(rank, transport, header, refusal, reply, mark)
        return
    try:
        if broken is not None:
            raise broken
        assert outgoing is not None
        outgoing.wait()
    except RuntimeError as err:
        server.unanswered(rank, payload if link is None else link.decoded_reply)
        raise _lost(err) from err
    stats.steps, stats.exchanges = header.step, stats.exchanges + 1
    reply = payload if link is None else link.decoded_reply
    for hook in server.on_exchange:
        hook(rank, header, reply, staleness)
