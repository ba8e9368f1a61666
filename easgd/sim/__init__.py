"""Single-process simulation: the roles of :mod:`easgd.roles` on a virtual clock, and stability maps."""

from easgd.sim.objectives import ClassifierObjective, Objective, Quadratic
from easgd.sim.simulator import EvalPoint, SimConfig, SimResult, Simulator, simulate

__all__ = [
    "ClassifierObjective",
    "EvalPoint",
    "Objective",
    "Quadratic",
    "SimConfig",
    "SimResult",
    "Simulator",
    "simulate",
]
