"""The same update rules as the rest of :mod:`easgd.algorithms`, written in place for the runtime.

The pure functions (``local.py``, ``elastic.py``, ``downpour.py``, ``averaging.py``) read like the
spec and return new tensors; these functions overwrite their first arguments instead, so a worker
step or a server update allocates nothing. ``tests/test_inplace.py`` proves every rule here equal
to its pure form (float64, within 1e-12) over many steps with exchanges.

Conventions: the tensors written are named in each docstring; every other argument is only read.
A gradient may be one flat tensor or the list of its pieces in order (per-parameter gradients as
autograd leaves them, each viewed flat), so the backward pass needs no copy into a flat buffer.
Server-side rules walk their tensors in chunks of :data:`CHUNK` values, so each value is read
from memory once and every intermediate stays in cache. Never imports ``torch.distributed``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

Grad = Tensor | Sequence[Tensor]
"""A flat gradient, or its pieces in order (their concatenation is the flat gradient)."""

CHUNK = 1 << 17
"""Values per chunk in the server's one-pass updates (512 KiB of float32: a few fit in L2)."""


def pieces(flat: Tensor, grad: Grad) -> tuple[list[Tensor], list[Tensor]]:
    """``flat`` cut like ``grad``: two aligned lists of 1-D tensors for the ``torch._foreach`` ops."""
    if isinstance(grad, Tensor):
        return [flat], [grad.reshape(-1)]
    parts = [g.reshape(-1) for g in grad]
    return list(flat.split([g.numel() for g in parts])), parts


def lookahead_(out: Tensor, params: Tensor, velocity: Tensor, *, momentum: float) -> Tensor:
    """out <- x + delta * v (Nesterov's look-ahead point; a copy of x when delta = 0)."""
    if momentum == 0:
        return out.copy_(params)
    return torch.add(params, velocity, alpha=momentum, out=out)


def nesterov_step_(
    params: Tensor, velocity: Tensor, grad: Grad, *, learning_rate: float, momentum: float
) -> None:
    """v <- delta * v - eta * g;  x <- x + v   (writes ``params`` and ``velocity``).

    Chunk by chunk, so v, g and x are each read from memory once (this runs every step). With
    momentum 0 it writes v = (-eta) g directly, bit for bit the pure rule's 0 * v - eta * g (the
    product is rounded once either way), which is what makes EASGD's step as cheap as plain SGD's
    apart from the one write of v.
    """
    velocities, grads = pieces(velocity, grad)
    if params.numel() <= CHUNK:  # all in cache anyway: three dispatches, not three per piece
        torch._foreach_mul_(velocities, momentum)
        torch._foreach_add_(velocities, grads, alpha=-learning_rate)
        params.add_(velocity)
        return
    params_pieces = pieces(params, grad)[0]
    for x_piece, v_piece, g_piece in zip(params_pieces, velocities, grads, strict=True):
        for x, v, g in _chunks(x_piece, v_piece, g_piece):
            if momentum == 0:
                torch.mul(g, -learning_rate, out=v)
            else:  # the same two operations per value as torch._foreach_mul_ / _foreach_add_
                v.mul_(momentum).add_(g, alpha=-learning_rate)
            x.add_(v)


def sgd_step_(
    params: Tensor,
    grad: Grad,
    *,
    learning_rate: float,
    buffer: Tensor,
    elastic_diff: Tensor | None = None,
) -> None:
    """x <- (x - e) - eta * g, or x <- x - eta * g without ``elastic_diff``  (writes ``params``).

    Bit for bit the pure :func:`apply_to_worker` then :func:`sgd_step`: the product eta * g is
    rounded on its own, never fused into the add. Chunk by chunk through ``buffer`` (at least
    min(CHUNK, params.numel()) values, kept in cache), so memory sees g read once and x read and
    written once, as in torch.optim.SGD's step; no velocity is written.
    """
    params_pieces, grads = pieces(params, grad)
    diffs = pieces(elastic_diff, grad)[0] if elastic_diff is not None else None
    if params.numel() <= CHUNK:  # all in cache anyway: a few dispatches, not a few per piece
        products = torch._foreach_mul(grads, -learning_rate)
        if diffs is not None:
            torch._foreach_sub_(params_pieces, diffs)
        torch._foreach_add_(params_pieces, products)
        return
    for index, (x_piece, g_piece) in enumerate(zip(params_pieces, grads, strict=True)):
        tensors = (x_piece, g_piece) if diffs is None else (x_piece, g_piece, diffs[index])
        for x, g, *e in _chunks(*tensors):
            product = torch.mul(g, -learning_rate, out=buffer[: g.numel()])
            if e:
                x.sub_(e[0])
            x.add_(product)


def downpour_local_step_(
    params: Tensor, accumulated: Tensor, grad: Grad, *, learning_rate: float
) -> None:
    """x <- x - eta * g;  a <- a - eta * g   (writes ``params`` and ``accumulated``)."""
    for flat in (params, accumulated):
        flats, grads = pieces(flat, grad)
        torch._foreach_add_(flats, grads, alpha=-learning_rate)


def downpour_pull_(params: Tensor, accumulated: Tensor, center: Tensor) -> None:
    """x <- center;  a <- 0   (writes ``params`` and ``accumulated``)."""
    params.copy_(center)
    accumulated.zero_()


def running_average_(average: Tensor, value: Tensor, *, rate: float) -> None:
    """z <- (1 - rate) * z + rate * x   (writes ``average``)."""
    average.mul_(1.0 - rate).add_(value, alpha=rate)


def apply_to_worker_(worker: Tensor, elastic_diff: Tensor) -> None:
    """x_i <- x_i - e   (writes ``worker``)."""
    worker.sub_(elastic_diff)


def gather_(out: Tensor, grad: Grad) -> Tensor:
    """out <- the flat gradient (its pieces concatenated)."""
    if isinstance(grad, Tensor):
        return out.copy_(grad.reshape(-1))
    return torch.cat([g.reshape(-1) for g in grad], out=out)


# -- server side: one pass over memory, chunk by chunk ----------------------------------------


def _chunks(*tensors: Tensor) -> Iterator[tuple[Tensor, ...]]:
    return zip(*(t.reshape(-1).split(CHUNK) for t in tensors), strict=True)


def elastic_update_(center: Tensor, worker: Tensor, out: Tensor, *, moving_rate: float) -> Tensor:
    """out <- e = alpha * (x_i - center);  center <- center + e.  Returns ``out``.

    ``out`` may be ``worker`` itself (the server's receive buffer): each chunk is read before it
    is overwritten. Bit for bit the pure :func:`elastic_difference` then :func:`apply_to_center`.
    """
    for x, c, e in _chunks(worker, center, out):
        torch.sub(x, c, out=e).mul_(moving_rate)
        c.add_(e)
    return out


def elastic_difference_(
    out: Tensor, worker: Tensor, center: Tensor, *, moving_rate: float
) -> float:
    """out <- alpha * (x_i - center) (``out`` may be ``worker``).  Returns ||out||, in the same pass."""
    norms = []
    for x, c, e in _chunks(worker, center, out):
        torch.sub(x, c, out=e).mul_(moving_rate)
        norms.append(torch.linalg.vector_norm(e))
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def replicated_center_exchange_(
    out: Tensor,
    worker: Tensor,
    center: Tensor,
    *,
    moving_rate: float,
    reduce_sum: Callable[[Tensor], Tensor],
) -> Tensor:
    """out <- e_i = alpha * (x_i - center);  center <- center + reduce_sum(e_i).  Returns ``out``.

    Synchronous EASGD's replicated-center exchange (the same operations as
    :func:`easgd.algorithms.replicated_center_exchange`, so bit for bit) writing into buffers the
    caller keeps, so an exchange allocates nothing. ``reduce_sum`` returns the sum of every worker's e_j and must not modify
    its argument; ``out`` must not be ``worker`` (the worker applies ``out`` afterwards).
    """
    for x, c, e in _chunks(worker, center, out):
        torch.sub(x, c, out=e).mul_(moving_rate)
    center.add_(reduce_sum(out))
    return out


def downpour_push_(center: Tensor, accumulated: Tensor, out: Tensor | None = None) -> None:
    """center <- center + a_i, and out <- the new center when given (``out`` may be ``a_i``)."""
    if out is None:
        center.add_(accumulated)
        return
    for a, c, o in _chunks(accumulated, center, out):
        c.add_(a)
        o.copy_(c)


def mdownpour_server_step_(
    center: Tensor,
    velocity: Tensor,
    grad_at_lookahead: Tensor,
    out: Tensor | None,
    *,
    learning_rate: float,
    momentum: float,
) -> None:
    """v~ <- delta v~ - eta g(y);  center <- center + v~;  out <- the new y = center + delta v~.

    ``out`` may be the gradient's own buffer; None skips the look-ahead.
    """
    chunks = _chunks(center, velocity, grad_at_lookahead, *(() if out is None else (out,)))
    for c, v, g, *o in chunks:
        v.mul_(momentum).add_(g, alpha=-learning_rate)
        c.add_(v)
        if o:
            torch.add(c, v, alpha=momentum, out=o[0])
