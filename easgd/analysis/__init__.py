"""Measuring what a run found: sharpness of a point, and probes inside simulated runs."""

from easgd.analysis.probes import (
    Diverged,
    ExchangeProbe,
    ProbedObjective,
    ProbeRecord,
    StopRun,
    TargetReached,
)
from easgd.analysis.sharpness import (
    PowerIteration,
    classifier_loss,
    filter_groups,
    hessian_vector_product,
    perturbation_loss_increase,
    top_hessian_eigenvalue,
)

__all__ = [
    "Diverged",
    "ExchangeProbe",
    "PowerIteration",
    "ProbeRecord",
    "ProbedObjective",
    "StopRun",
    "TargetReached",
    "classifier_loss",
    "filter_groups",
    "hessian_vector_product",
    "perturbation_loss_increase",
    "top_hessian_eigenvalue",
]
