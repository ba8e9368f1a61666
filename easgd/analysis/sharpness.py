"""How sharp is a minimum: the top Hessian eigenvalue and the loss increase under random kicks.

Both measures take a *loss function of a flat point* (a 1-D tensor of all parameters, the form every
update rule in this project uses) that is differentiable twice, for example
:func:`classifier_loss` over a model and a fixed dataset (full batch, so the measure is
deterministic).

- :func:`top_hessian_eigenvalue`: power iteration on Hessian-vector products (autograd
  double-backward, no Hessian is formed). It converges to the eigenvalue of largest magnitude;
  near a minimum that is the largest (positive) curvature, the figure the "edge of stability"
  literature calls sharpness.
- :func:`perturbation_loss_increase`: the mean of L(x + d) - L(x) over random directions d of a
  fixed *relative* size r, for a few radii. ``relative`` scaling: d = r ||x|| u / ||u|| with u
  Gaussian. ``filter`` scaling (Li et al., "Visualizing the loss landscape of neural nets", 2018):
  the vector is cut into groups (one per output filter / row of each weight, one per bias) and
  each group of d gets r times the norm of the same group of x, so the kick is scale-invariant per
  filter (a ReLU network rescaled layer by layer gets the same figure). On a quadratic
  L(x) = 1/2 (x - m)^T H (x - m) at its minimum m = x, ``relative`` scaling gives exactly
  E[L(x + d) - L(x)] = 1/2 r^2 ||x||^2 tr(H) / n (n parameters), since E[u u^T / ||u||^2] = I / n.

Example::

    >>> import torch
    >>> curvature = torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64)
    >>> loss = lambda x: 0.5 * (curvature * x * x).sum()
    >>> top = top_hessian_eigenvalue(loss, torch.ones(3, dtype=torch.float64))
    >>> round(top.eigenvalue, 3)
    3.0
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

LossFn = Callable[[Tensor], Tensor]
"""Maps a flat point to a scalar loss tensor, differentiable twice in the point."""

SCALINGS = ("relative", "filter")


def hessian_vector_product(loss_fn: LossFn, point: Tensor, vector: Tensor) -> Tensor:
    """H(point) @ vector by double backward (the Hessian is never formed)."""
    if vector.shape != point.shape:
        raise ValueError(f"vector has shape {tuple(vector.shape)}, point {tuple(point.shape)}")
    x = point.detach().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(loss_fn(x), x, create_graph=True)
        (product,) = torch.autograd.grad(grad, x, grad_outputs=vector.detach())
    return product.detach()


@dataclass(frozen=True)
class PowerIteration:
    """Result of :func:`top_hessian_eigenvalue`."""

    eigenvalue: float
    """Rayleigh quotient v^T H v of the last unit iterate v."""
    vector: Tensor
    """The eigenvector estimate H v / ||H v|| (unit norm)."""
    iterations: int
    """Hessian-vector products used."""
    converged: bool
    """Whether the relative change of the estimate fell below the tolerance."""


def top_hessian_eigenvalue(
    loss_fn: LossFn,
    point: Tensor,
    *,
    iterations: int = 100,
    tolerance: float = 1e-4,
    generator: torch.Generator | None = None,
) -> PowerIteration:
    """The dominant eigenvalue of the Hessian of ``loss_fn`` at ``point`` by power iteration.

    Stops when the Rayleigh quotient changes by less than ``tolerance`` (relative) between two
    iterations, or after ``iterations`` Hessian-vector products.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if point.ndim != 1:
        raise ValueError(f"point must be a flat 1-D vector, got shape {tuple(point.shape)}")
    vector = torch.randn(point.shape, dtype=point.dtype, generator=generator)
    vector = vector / vector.norm()
    estimate, converged, used = math.nan, False, 0
    for used in range(1, iterations + 1):  # noqa: B007 - reported after the loop
        product = hessian_vector_product(loss_fn, point, vector)
        previous, estimate = estimate, float(torch.dot(vector, product))
        norm = product.norm()
        if norm == 0:  # H v = 0: v is an eigenvector of eigenvalue 0
            converged = True
            break
        vector = product / norm
        if abs(estimate - previous) <= tolerance * max(abs(estimate), 1e-12):
            converged = True
            break
    return PowerIteration(eigenvalue=estimate, vector=vector, iterations=used, converged=converged)


def perturbation_loss_increase(
    loss_fn: LossFn,
    point: Tensor,
    radii: Sequence[float],
    *,
    samples: int = 10,
    scaling: str = "relative",
    group_sizes: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
) -> list[float]:
    """Mean L(point + d) - L(point) over ``samples`` random directions, one figure per radius.

    ``scaling="relative"``: ||d|| = r ||point||. ``scaling="filter"``: ``group_sizes`` cuts the
    vector into consecutive groups (see :func:`filter_groups`) and each group of d has r times the
    norm of that group of ``point``. The same directions are used for every radius, so the
    figures are comparable across radii.
    """
    if scaling not in SCALINGS:
        raise ValueError(f"scaling={scaling!r}; allowed: {', '.join(SCALINGS)}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if any(r < 0 for r in radii):
        raise ValueError(f"radii must be >= 0, got {list(radii)}")
    if scaling == "filter" and (group_sizes is None or sum(group_sizes) != point.numel()):
        raise ValueError(
            "scaling='filter' needs group_sizes summing to the number of parameters "
            f"({point.numel()}); build them with filter_groups(module)"
        )
    point = point.detach()
    with torch.no_grad():
        base = float(loss_fn(point))
        increases = [0.0] * len(radii)
        for _ in range(samples):
            direction = _scaled_direction(point, scaling, group_sizes, generator)
            for k, radius in enumerate(radii):
                increases[k] += float(loss_fn(point + radius * direction)) - base
    return [total / samples for total in increases]


def _scaled_direction(
    point: Tensor,
    scaling: str,
    group_sizes: Sequence[int] | None,
    generator: torch.Generator | None,
) -> Tensor:
    """A random direction of relative size 1 (whole vector, or group by group)."""
    noise = torch.randn(point.shape, dtype=point.dtype, generator=generator)
    if scaling == "relative":
        return noise * (point.norm() / noise.norm())
    assert group_sizes is not None
    pieces = []
    for x_part, u_part in zip(
        point.split(list(group_sizes)), noise.split(list(group_sizes)), strict=True
    ):
        pieces.append(u_part * (x_part.norm() / u_part.norm().clamp_min(1e-30)))
    return torch.cat(pieces)


def filter_groups(module: nn.Module) -> list[int]:
    """Group sizes for ``scaling="filter"``, in the order of ``module.parameters()``.

    A weight of shape (out, ...) gives ``out`` groups of prod(...) values (one per output filter
    or row; parameters are stored row-major, so a filter's values are consecutive); a bias or
    other 1-D parameter is one group.
    """
    sizes: list[int] = []
    for param in module.parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1:
            sizes.append(param.numel())
        else:
            sizes.extend([param[0].numel()] * param.shape[0])
    return sizes


def classifier_loss(module: nn.Module, inputs: Tensor, targets: Tensor) -> LossFn:
    """Mean cross-entropy of ``module`` on (inputs, targets) as a function of a flat point.

    The point is split into the module's parameters (order of ``module.parameters()``, the order
    :class:`easgd.flat.FlatModel` uses) and the module is called functionally, so the loss is
    differentiable in the point. The module is put in eval mode (no dropout noise).
    """
    names = [name for name, p in module.named_parameters() if p.requires_grad]
    shapes = [p.shape for p in module.parameters() if p.requires_grad]
    sizes = [math.prod(shape) for shape in shapes]
    total = sum(sizes)
    module.eval()

    def loss(point: Tensor) -> Tensor:
        if point.numel() != total:
            raise ValueError(f"point has {point.numel()} values, the model {total} parameters")
        params = {
            name: piece.view(shape)
            for name, piece, shape in zip(names, point.split(sizes), shapes, strict=True)
        }
        return F.cross_entropy(functional_call(module, params, (inputs,)), targets)

    return loss
