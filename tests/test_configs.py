"""Every config group option composes and validates; wrong keys and values fail with their names."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from easgd.config.schema import TrainConfig, validate
from easgd.config.store import config_dir, register

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
register()


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def composed(*overrides: str) -> TrainConfig:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return validate(compose(config_name="config", overrides=list(overrides)))


def test_groups_have_the_documented_options() -> None:
    assert options("algorithm") == sorted(
        [
            "easgd",
            "eamsgd",
            "downpour",
            "mdownpour",
            "adownpour",
            "mvadownpour",
            "sgd",
            "msgd",
            "asgd",
            "mvasgd",
        ]
    )
    assert {"digits", "synthetic", "mnist", "cifar10"} <= set(options("data"))
    assert {"mlp", "lenet", "cifar7"} <= set(options("model"))


@pytest.mark.parametrize("name", options("algorithm"))
def test_every_algorithm_composes(name: str) -> None:
    extra = ["comm=every_step"] if name == "mdownpour" else []
    cfg = composed(f"algorithm={name}", *extra)
    assert cfg.algorithm.name == name
    assert cfg.world_size == (1 if name in ("sgd", "msgd", "asgd", "mvasgd") else cfg.workers + 1)


@pytest.mark.parametrize("group", ["model", "data", "comm"])
def test_every_option_of_the_other_groups_composes(group: str) -> None:
    for option in options(group):
        extra = (
            [f"data.root=/tmp/{option}"]
            if group == "data" and option in ("mnist", "cifar10")
            else []
        )
        cfg = composed(f"{group}={option}", *extra)
        # every key the option file sets arrives in the composed, typed config with its value
        written = OmegaConf.to_container(OmegaConf.load(CONFIGS / group / f"{option}.yaml"))
        assert isinstance(written, dict) and written
        for key, value in written.items():
            if value == "???":  # mandatory: given on the command line (extra)
                continue
            assert getattr(getattr(cfg, group), key) == value, (group, option, key)


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes(experiment: str) -> None:
    extra = ["data.root=/tmp/cifar"] if experiment == "paper_cifar10" else []
    cfg = composed(f"experiment={experiment}", *extra)
    if experiment == "paper_cifar10":
        assert cfg.model.name == "cifar7" and cfg.data.name == "cifar10" and cfg.comm.period == 10


def test_paper_defaults() -> None:
    cfg = composed()
    assert (
        cfg.algorithm.name == "eamsgd"
        and cfg.algorithm.momentum == 0.99
        and cfg.algorithm.beta == 0.9
    )
    assert cfg.algorithm.resolved_moving_rate(cfg.workers) == pytest.approx(0.9 / 4)
    assert cfg.comm.period == 10 and cfg.data.batch_size == 128 and cfg.data.name == "digits"


def test_the_trainer_reads_the_top_level_configs_of_a_source_tree() -> None:
    assert config_dir() == CONFIGS


@pytest.mark.parametrize("group", ["experiment", "algorithm", "model", "data", "comm", "cost"])
def test_an_unknown_option_fails_at_composition_listing_the_allowed_ones(group: str) -> None:
    with pytest.raises(MissingConfigException) as info:
        composed(f"{group}=nosuch")
    message = str(info.value)
    assert f"Could not find '{group}/nosuch'" in message
    listed = message.split(f"Available options in '{group}':")[1].split("Config search path")[0]
    assert sorted(listed.split()) == sorted(options(group))


def test_wrong_key_fails_at_composition_naming_it() -> None:
    with pytest.raises(ConfigCompositionException) as info:
        composed("comm.perod=3")
    assert "perod" in str(info.value.__cause__ or info.value)


def test_wrong_type_fails_at_composition() -> None:
    with pytest.raises((ConfigCompositionException, ValidationError, ConfigKeyError)) as info:
        composed("comm.period=often")
    assert "period" in str(info.value) + str(info.value.__cause__)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("algorithm.name=adam", "algorithm.name='adam' is not known"),
        ("algorithm.beta=7.0", "beta must be in (0, num_workers=4)"),
        ("data.sampling=random", "data.sampling='random'"),
        ("comm.slowdown=[3.0]", "comm.slowdown has 1 factors for 4 workers"),
        ("comm.overlap=true", None),
        ("worker_failure=retry", "worker_failure='retry'"),
        ("device=tpu", "device='tpu'"),
    ],
)
def test_invalid_values_name_key_and_allowed(override: str, message: str | None) -> None:
    if message is None:
        assert composed(override).comm.overlap  # valid for the default eamsgd
        with pytest.raises(ValueError, match="comm.overlap is for easgd/eamsgd only"):
            composed(override, "algorithm=downpour")
        return
    with pytest.raises(ValueError) as info:
        composed(override)
    assert message in str(info.value)
