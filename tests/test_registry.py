"""The algorithm registry: one place answers every "which algorithms may ..." question.

The expectations are written out here from the spec (docs/algorithms.md) and the
paper, not read back from the registry, so a wrong entry fails.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from easgd import roles
from easgd.algorithms.registry import names, spec_of
from easgd.api.roles import DownpourOptimizerRole, ElasticOptimizerRole, ModelParams
from easgd.config.algorithm import AlgorithmConfig
from easgd.config.schema import TrainConfig
from easgd.roles.averaging import AveragingServer, AveragingWorker

ALL = ("easgd", "eamsgd", "downpour", "adownpour", "mvadownpour", "mdownpour")
ALL += ("localsgd", "diloco")  # issue 20: what people pick instead (averaging family)
ALL += ("sgd", "msgd", "asgd", "mvasgd")


def test_the_registry_knows_every_rule_of_the_spec_and_its_family() -> None:
    assert names() == ALL
    assert names(family="elastic") == ("easgd", "eamsgd")
    assert names(family="downpour") == ("downpour", "adownpour", "mvadownpour", "mdownpour")
    assert names(family="averaging") == ("localsgd", "diloco")
    assert names(family="sequential") == ("sgd", "msgd", "asgd", "mvasgd")
    assert names(worker_momentum=True) == ("eamsgd", "localsgd", "diloco", "msgd")
    assert names(server_momentum=True) == ("mdownpour",)
    assert names(average="polyak") == ("adownpour", "asgd")
    assert names(average="moving") == ("mvadownpour", "mvasgd")


def test_placement_answers() -> None:
    assert names(overlap=True) == ("easgd", "eamsgd")
    assert names(allreduce=True) == ("easgd", "eamsgd", "localsgd", "diloco")
    # the averaging family needs every worker at once: no parameter server
    assert names(parameter_server=False) == ("localsgd", "diloco")
    assert names(outer_optimizer=True) == ("diloco",)
    assert names(own_loop=True) == ("easgd", "eamsgd", "downpour", "adownpour", "mvadownpour")
    assert {n: spec_of(n).ledger for n in ALL if spec_of(n).ledger} == {
        "easgd": "reply",
        "eamsgd": "reply",
        "downpour": "payload",
        "adownpour": "payload",
        "mvadownpour": "payload",
    }
    assert [n for n in ALL if spec_of(n).fixed_comm_period == 1] == ["mdownpour"]


def test_refusals_name_the_key_and_the_allowed_values() -> None:
    with pytest.raises(ValueError, match=r"algorithm.name='nosuch' is not known; allowed: easgd"):
        spec_of("nosuch")
    with pytest.raises(ValueError, match=r"mdownpour needs comm.period=1 \(spec\), got 4"):
        TrainConfig(algorithm=AlgorithmConfig("mdownpour"), comm=_comm(period=4))
    with pytest.raises(ValueError, match=r"comm.overlap is for easgd/eamsgd only, not 'downpour'"):
        TrainConfig(algorithm=AlgorithmConfig("downpour"), comm=_comm(overlap=True))
    with pytest.raises(
        ValueError, match=r"topology=allreduce runs synchronous easgd/eamsgd/localsgd/diloco"
    ):
        TrainConfig(algorithm=AlgorithmConfig("downpour"), topology="allreduce")
    with pytest.raises(ValueError, match=r"api.serve\(algorithm='mdownpour'\): MDOWNPOUR"):
        spec_of("mdownpour").check_own_loop("api.serve")
    with pytest.raises(ValueError, match=r"checkpoint.ledger is for easgd, eamsgd, downpour"):
        spec_of("mdownpour").check_ledger()


def _comm(**keys: object):  # type: ignore[no-untyped-def]
    from easgd.config.schema import CommConfig

    return CommConfig(**keys)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ALL)
def test_the_factories_build_the_role_the_family_names(name: str) -> None:
    momentum = 0.9 if name in ("eamsgd", "msgd", "mdownpour") else 0.0
    rate = 0.01 if name in ("mvadownpour", "mvasgd") else None
    config = AlgorithmConfig(name, momentum=momentum, average_rate=rate)
    start = torch.zeros(4)
    expected_worker = {
        "easgd": roles.ElasticWorker,
        "eamsgd": roles.ElasticWorker,
        "downpour": roles.DownpourWorker,
        "adownpour": roles.DownpourWorker,
        "mvadownpour": roles.DownpourWorker,
        "mdownpour": roles.MDownpourWorker,
        "localsgd": AveragingWorker,
        "diloco": AveragingWorker,
    }.get(name, roles.SequentialWorker)
    assert type(roles.make_worker_role(config, start, comm_period=1)) is expected_worker
    if name in ("sgd", "msgd", "asgd", "mvasgd"):
        with pytest.raises(ValueError, match="runs without a server"):
            roles.make_server_role(config, start, num_workers=2)
        return
    server = roles.make_server_role(config, start, num_workers=2)
    expected_server = {
        "easgd": roles.ElasticServer,
        "eamsgd": roles.ElasticServer,
        "mdownpour": roles.MDownpourServer,
        "localsgd": AveragingServer,
        "diloco": AveragingServer,
    }
    assert type(server) is expected_server.get(name, roles.DownpourServer)


# -- the own-loop API's roles return copies too ------------------------------------------------


@pytest.mark.parametrize("role_type", [ElasticOptimizerRole, DownpourOptimizerRole])
def test_api_roles_state_dict_is_a_copy(role_type: type) -> None:
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    role = role_type(ModelParams(list(model.parameters())), optimizer, comm_period=1)
    model(torch.ones(1, 3)).sum().backward()
    role.local_step()
    state = role.state_dict()
    saved = {k: v.clone() for k, v in state.items() if isinstance(v, torch.Tensor)}
    model(torch.ones(1, 3)).sum().backward()
    role.local_step()  # in place (DOWNPOUR's a_i keeps accumulating): must not reach `state`
    for key, value in saved.items():
        assert torch.equal(state[key], value), key
    assert state["step"] == 1
