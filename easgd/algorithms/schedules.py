"""Learning-rate schedules: eta_t, the step size of a worker's local step t_i, as pure functions.

``t`` is always the worker's own local step counter t_i (0 for its first step, resumed with its
checkpoint), never a global clock: each worker decays on its own, as in the authors' code, and a
simulated run and a real one take the same eta_t at the same t_i.

Every schedule is eta_t = eta * warmup(t) * decay(s) with s = max(0, t - W):

- linear warm-up over W steps:  warmup(t) = min(1, (t + 1) / W)   (1 when W = 0); the decay
  starts when the warm-up ends;
- ``constant``:  decay(s) = 1;
- ``cosine``:    decay(s) = r + (1 - r) * (1 + cos(pi * min(s, T) / T)) / 2, T = total - W decay
  steps, r the final fraction of eta;
- ``step``:      decay(s) = gamma ** floor(s / k)  (multiply by gamma every k steps);
- ``power``:     decay(s) = (1 + s * lrd) ** (-lrp), the EASGD authors' eta / (1 + t lrd)^lrp
  (their ``lrd`` and ``lrp``; lrp = 1 is Torch7's ``learningRateDecay``).

What eta_t does to the rules (the spec's equations with eta replaced by eta_t, nothing else):
EASGD x_i <- x_i - eta_t g; EAMSGD v_i <- delta v_i - eta_t g, x_i <- x_i + v_i (the rate sits
inside the velocity, so a past step keeps the rate it was taken with); DOWNPOUR
x_i <- x_i - eta_t g, a_i <- a_i - eta_t g; the sequential baselines likewise. The moving rate
alpha stays the configured constant: the spec's exchange is written with alpha, not eta * rho,
and the server, which applies the other half of each elastic move, knows no worker's t_i (so a
per-worker alpha_t would break the elastic symmetry). The effective coupling rho = alpha / eta_t
therefore grows as eta_t decays. MDOWNPOUR's gradient step is the server's, not a worker's, so
these schedules do not apply to it (refused at config time).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field


def warmup_factor(step: int, *, warmup_steps: int) -> float:
    """min(1, (t + 1) / W): step t = 0 already moves (eta / W), step W - 1 reaches eta."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


def cosine_factor(step: int, *, decay_steps: int, final_ratio: float) -> float:
    """r + (1 - r) (1 + cos(pi min(s, T) / T)) / 2: 1 at s = 0, r from s = T on."""
    progress = min(step, decay_steps) / decay_steps
    return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def step_decay_factor(step: int, *, every: int, factor: float) -> float:
    """gamma ** floor(s / k): ``factor`` gamma applied once every ``every`` k steps."""
    return factor ** (step // every)


def power_decay_factor(step: int, *, decay_rate: float, decay_power: float) -> float:
    """(1 + s * lrd) ** (-lrp), the authors' inverse-power decay."""
    return (1.0 + step * decay_rate) ** (-decay_power)


def _no_decay(step: int) -> float:
    return 1.0


DECAYS: dict[str, Callable[..., float]] = {
    "constant": _no_decay,
    "cosine": cosine_factor,
    "step": step_decay_factor,
    "power": power_decay_factor,
}
"""Each schedule's decay(s), called with the schedule's ``options`` as keyword arguments."""


@dataclass(frozen=True)
class LearningRateSchedule:
    """eta_t for a worker's local step t (see the module docstring for the equations).

    ``kind`` names the decay (:data:`DECAYS`) and ``options`` are its keyword arguments: cosine
    ``decay_steps`` (T) and ``final_ratio`` (r); step ``every`` (k) and ``factor`` (gamma);
    power ``decay_rate`` (lrd) and ``decay_power`` (lrp); constant none. ``warmup_steps`` is W
    (0: none). The values come checked from ``easgd.config.schema`` (``optim.*``), which names
    the key of a bad value; the checks here guard direct use.
    """

    kind: str = "constant"
    warmup_steps: int = 0
    options: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in DECAYS:
            raise ValueError(f"schedule kind={self.kind!r}; allowed: {', '.join(DECAYS)}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps!r}")
        try:
            self.factor_at(0)
        except TypeError as err:
            raise ValueError(
                f"the {self.kind} schedule's options {dict(self.options)}: {err}"
            ) from None

    def factor_at(self, step: int) -> float:
        """eta_t / eta at local step t: warmup(t) * decay(max(0, t - W))."""
        warmup = warmup_factor(step, warmup_steps=self.warmup_steps)
        return warmup * DECAYS[self.kind](max(0, step - self.warmup_steps), **self.options)

    def learning_rate(self, step: int, *, learning_rate: float) -> float:
        """eta_t = eta * factor(t) at local step t (t >= 0)."""
        if step < 0:
            raise ValueError(f"the local step t must be >= 0, got {step}")
        return learning_rate * self.factor_at(step)


SCHEDULES = tuple(DECAYS)
"""The decay shapes; any of them may start with a linear warm-up."""
