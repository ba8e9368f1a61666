"""The algorithm registry: one entry per update rule says what the rest of the system may do with it.

Every question that used to be answered by a list of names ("is it elastic?", "may it overlap?",
"does it run over all-reduce?", "what does the ledger audit?", "can the own-loop API serve it?")
is answered here, once. Configs, roles, topologies, the simulator and the API ask
:func:`spec_of`; adding an algorithm means adding its rule module and one :func:`register` call.

The registry is data about the rules of :mod:`easgd.algorithms`; it imports nothing from the
runtime (and never ``torch.distributed``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Family = Literal["elastic", "downpour", "averaging", "sequential"]
"""elastic: x~ pulled toward workers by the elastic difference (EASGD, EAMSGD); downpour: workers
push accumulated updates and pull the center; averaging: every tau steps all workers take the
center computed from their average (local SGD, DiLoCo; synchronous only); sequential: one
process, no server."""

AverageKind = Literal["none", "polyak", "moving"]
"""What the evaluated variable is: the center (none), a Polyak average 1/s, a moving average."""


@dataclass(frozen=True)
class AlgorithmSpec:
    """What one update rule is and where it may run."""

    name: str
    """The config name (``algorithm=<name>``)."""
    family: Family
    """See :data:`Family`."""
    summary: str
    """One line for ``--help`` and error messages."""
    worker_momentum: bool = False
    """The worker's local step is Nesterov momentum (EAMSGD, MSGD): ``algorithm.momentum`` acts
    there."""
    server_momentum: bool = False
    """The server takes a Nesterov step from pushed gradients (MDOWNPOUR)."""
    average: AverageKind = "none"
    """Whether the evaluated variable is an average z (needs ``average_rate`` when moving)."""
    fixed_comm_period: int | None = None
    """The one communication period the rule is defined for (MDOWNPOUR: 1), else None."""
    overlap: bool = False
    """Exchanges may run in a background thread while the worker steps (a reply that arrives
    late is still a valid elastic move; a DOWNPOUR pull would discard the steps taken meanwhile)."""
    allreduce: bool = False
    """Runs synchronously over all-reduce with a replicated center (``topology=allreduce``)."""
    ledger: Literal["reply", "payload"] | None = None
    """What ``checkpoint.ledger`` sums: the elastic differences received (reply) or the
    accumulations pushed (payload); None: not audited."""
    own_loop: bool = False
    """``api.serve`` / ``api.ElasticOptimizer`` can run it around a user's optimizer."""
    own_loop_note: str = ""
    """Why the own-loop API cannot run it (when ``own_loop`` is False)."""
    parameter_server: bool = True
    """Runs with a parameter server (``topology=server``); the averaging family needs every
    worker at once and runs over all-reduce only."""
    outer_optimizer: bool = False
    """The center takes an outer Nesterov step on the pseudo-gradient (DiLoCo):
    ``algorithm.outer_learning_rate`` and ``algorithm.outer_momentum`` act."""

    @property
    def uses_server(self) -> bool:
        """True for the distributed algorithms (a center), False for the sequential baselines."""
        return self.family != "sequential"

    @property
    def elastic(self) -> bool:
        """True for the elastic family: a moving rate alpha and an elastic difference."""
        return self.family == "elastic"

    @property
    def momentum(self) -> bool:
        """Whether ``algorithm.momentum`` acts (on the worker or on the server)."""
        return self.worker_momentum or self.server_momentum

    # -- the refusals, each written once; ``key`` names the setting in the caller's words ------
    def check_comm_period(self, period: int, *, key: str = "comm.period") -> None:
        """Refuse a period the rule is not defined for (MDOWNPOUR: only 1)."""
        if self.fixed_comm_period is not None and period != self.fixed_comm_period:
            raise ValueError(
                f"{self.name} needs {key}={self.fixed_comm_period} (spec), got {period}"
            )

    def check_overlap(self, overlap: bool, *, key: str = "comm.overlap") -> None:
        """Refuse overlapped exchanges for rules whose reply cannot arrive late."""
        if overlap and not self.overlap:
            raise ValueError(
                f"{key} is for {'/'.join(names(overlap=True))} only, not {self.name!r} "
                "(a DOWNPOUR pull would discard the steps taken meanwhile)"
            )

    def check_allreduce(self) -> None:
        """Refuse ``topology=allreduce`` for rules without a synchronous replicated form."""
        if not self.allreduce:
            raise ValueError(
                f"topology=allreduce runs synchronous {'/'.join(names(allreduce=True))}, not "
                f"{self.name!r}; use algorithm={' or '.join(names(allreduce=True))}, "
                "or topology=server"
            )

    def check_parameter_server(self) -> None:
        """Refuse ``topology=server`` for rules that average every worker at once."""
        if self.uses_server and not self.parameter_server:
            raise ValueError(
                f"{self.name!r} averages all workers at once and runs over all-reduce: use "
                f"topology=allreduce (torchrun --nproc_per_node=<workers>), not topology=server"
            )

    def check_own_loop(self, where: str) -> None:
        """Refuse rules the own-loop API cannot run (``where`` names the call)."""
        if self.own_loop:
            return
        allowed = ", ".join(names(own_loop=True))
        why = self.own_loop_note or f"{self.name!r} has no server"
        raise ValueError(f"{where}(algorithm={self.name!r}): {why}; allowed: {allowed}")

    def check_ledger(self) -> None:
        """Refuse ``checkpoint.ledger`` for rules whose center changes are not audited."""
        if self.ledger is None:
            raise ValueError(
                f"checkpoint.ledger is for {', '.join(n for n in _REGISTRY if _REGISTRY[n].ledger)}"
                f", not {self.name!r}; set checkpoint.ledger=false"
            )


_REGISTRY: dict[str, AlgorithmSpec] = {}


def register(spec: AlgorithmSpec) -> AlgorithmSpec:
    """Add ``spec`` to the registry (a name is registered once)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"algorithm {spec.name!r} is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def spec_of(name: str, *, key: str = "algorithm.name") -> AlgorithmSpec:
    """The registered spec of ``name``; a ValueError naming ``key`` and the known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"{key}={name!r} is not known; allowed: {', '.join(_REGISTRY)}") from None


def names(**where: object) -> tuple[str, ...]:
    """Registered names, in registration order, whose spec attributes equal ``where``.

    ``names(family="elastic")`` -> ("easgd", "eamsgd"); ``names(own_loop=True)``; ``names()``: all.
    """
    return tuple(
        name
        for name, spec in _REGISTRY.items()
        if all(getattr(spec, key) == value for key, value in where.items())
    )


# the elastic family: a late reply is still a valid move, a replicated center works, the
# ledger sums the differences received, and a wrapped optimizer can run it
_ELASTIC = {"overlap": True, "allreduce": True, "ledger": "reply", "own_loop": True}
register(
    AlgorithmSpec(
        "easgd",
        "elastic",
        "EASGD (Algorithm 1): SGD workers pulled elastically toward the center",
        **_ELASTIC,  # type: ignore[arg-type]
    )
)
register(
    AlgorithmSpec(
        "eamsgd",
        "elastic",
        "EAMSGD (Algorithm 2): Nesterov-momentum workers with the elastic pull",
        worker_momentum=True,
        **_ELASTIC,  # type: ignore[arg-type]
    )
)
register(
    AlgorithmSpec(
        "downpour",
        "downpour",
        "DOWNPOUR: push accumulated updates every tau steps, pull the center",
        ledger="payload",
        own_loop=True,
    )
)
register(
    AlgorithmSpec(
        "adownpour",
        "downpour",
        "ADOWNPOUR: DOWNPOUR evaluated on the Polyak average of the center",
        average="polyak",
        ledger="payload",
        own_loop=True,
    )
)
register(
    AlgorithmSpec(
        "mvadownpour",
        "downpour",
        "MVADOWNPOUR: DOWNPOUR evaluated on a moving average of the center",
        average="moving",
        ledger="payload",
        own_loop=True,
    )
)
register(
    AlgorithmSpec(
        "mdownpour",
        "downpour",
        "MDOWNPOUR: Nesterov momentum on the server from pushed gradients (tau = 1)",
        server_momentum=True,
        fixed_comm_period=1,
        own_loop_note=(
            "MDOWNPOUR's momentum step runs on the server from gradients, which a wrapped "
            "optimizer does not send; use downpour, or easgd.train"
        ),
    )
)
# the averaging family: synchronous rounds over all-reduce; the inner step is the worker's own
# (SGD or Nesterov), so algorithm.momentum acts on the worker
_AVERAGING = {
    "allreduce": True,
    "parameter_server": False,
    "worker_momentum": True,
    "own_loop_note": (
        "it averages every worker at once over an all-reduce group, not through api.serve's "
        "server; wrap the optimizer in api.AveragingOptimizer"
    ),
}
register(
    AlgorithmSpec(
        "localsgd",
        "averaging",
        "local SGD: every tau steps all workers take their average (PeriodicModelAverager)",
        **_AVERAGING,  # type: ignore[arg-type]
    )
)
register(
    AlgorithmSpec(
        "diloco",
        "averaging",
        "DiLoCo: every H steps an outer Nesterov step on the averaged pseudo-gradient",
        outer_optimizer=True,
        **_AVERAGING,  # type: ignore[arg-type]
    )
)
register(AlgorithmSpec("sgd", "sequential", "sequential SGD (p = 1)"))
register(
    AlgorithmSpec(
        "msgd", "sequential", "sequential Nesterov-momentum SGD (p = 1)", worker_momentum=True
    )
)
register(AlgorithmSpec("asgd", "sequential", "sequential SGD, Polyak-averaged", average="polyak"))
register(AlgorithmSpec("mvasgd", "sequential", "sequential SGD, moving-averaged", average="moving"))
