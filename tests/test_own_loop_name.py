"""The own-loop summary names the algorithm the workers ran: momentum on a worker is EAMSGD."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from easgd.api.naming import algorithm_ran, describe_optimizer, publish_optimizer, read_optimizers


def sgd(momentum: float, nesterov: bool = False) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        nn.Linear(2, 1).parameters(), lr=0.1, momentum=momentum, nesterov=nesterov
    )


def test_the_optimizer_description_holds_its_largest_momentum() -> None:
    two_groups = torch.optim.SGD(
        [{"params": [nn.Parameter(torch.zeros(1))], "momentum": 0.5},
         {"params": [nn.Parameter(torch.zeros(1))]}],
        lr=0.1, momentum=0.0,
    )  # fmt: skip
    assert describe_optimizer(two_groups) == {"type": "SGD", "momentum": 0.5}
    adam = torch.optim.Adam(nn.Linear(2, 1).parameters())
    assert describe_optimizer(adam) == {"type": "Adam", "momentum": None}


@pytest.mark.parametrize(
    ("declared", "momenta", "ran"),
    [
        ("easgd", [0.9, 0.9], "eamsgd"),  # the example: nesterov SGD workers under the default
        ("eamsgd", [0.0, 0.0], "easgd"),
        ("easgd", [0.0, 0.9], "eamsgd"),
        ("easgd", [0.0], "easgd"),
        ("easgd", [None, 0.9], "easgd"),  # an optimizer without momentum: the user's word
        ("easgd", [], "easgd"),  # no description (no store)
        ("downpour", [0.9], "downpour"),  # not the elastic rule
    ],
)
def test_the_elastic_rule_is_named_by_the_workers_momentum(
    declared: str, momenta: list[float | None], ran: str
) -> None:
    described = [{"type": "SGD", "momentum": m} for m in momenta]
    assert algorithm_ran(declared, described) == ran


def test_workers_publish_and_the_server_reads_what_was_published() -> None:
    store = dist.HashStore()
    publish_optimizer(store, 1, sgd(0.9, nesterov=True))
    publish_optimizer(store, 3, sgd(0.0))
    publish_optimizer(None, 2, sgd(0.9))  # no store: nothing to publish, no error
    assert read_optimizers(store, [1, 2, 3]) == [
        {"type": "SGD", "momentum": 0.9},
        {"type": "SGD", "momentum": 0.0},
    ]
    assert read_optimizers(None, [1]) == []
