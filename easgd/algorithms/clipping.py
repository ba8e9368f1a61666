"""Gradient clipping by global norm, on the flat gradient of a local step.

g <- g * min(1, c / (||g|| + 1e-6)), the formula of ``torch.nn.utils.clip_grad_norm_`` (2-norm),
with ||g|| the norm of the whole flat gradient. The gradient clipped is the spec's g, weight decay
included: clipping comes after weight decay, so every local step satisfies
||eta_t g|| <= eta_t c whatever the decay. (``clip_grad_norm_`` followed by
``torch.optim.SGD(weight_decay=...)`` clips before the decay instead; the two agree when
weight_decay = 0, the default.) Never imports ``torch.distributed``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from easgd.algorithms.inplace import Grad

EPS = 1e-6
"""Added to the norm before dividing, as ``torch.nn.utils.clip_grad_norm_`` does."""


def clip_grad_norm_(grad: Grad, *, max_norm: float) -> Tensor:
    """Scale ``grad`` (flat, or its pieces in order) in place so its global 2-norm is at most
    ``max_norm``; returns the norm before clipping (a 0-d tensor on the gradient's device).

    The norm is taken over the flat vector whichever form ``grad`` has (pieces are gathered
    first), so the flat gradient of the simulator and the per-parameter pieces of the runtime are
    scaled by the same coefficient, bit for bit. No host synchronisation: the coefficient stays
    a tensor, and (as in torch) the multiplication by a clamped 1.0 changes nothing.
    """
    if max_norm <= 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm!r}")
    if isinstance(grad, Tensor):
        flat, pieces = grad.reshape(-1), [grad]
    else:
        pieces = list(grad)
        flat = torch.cat([g.reshape(-1) for g in pieces])
    total = torch.linalg.vector_norm(flat)
    coefficient = torch.clamp(max_norm / (total + EPS), max=1.0)
    torch._foreach_mul_(pieces, coefficient)
    return total
