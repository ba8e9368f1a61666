"""Cost profiles that describe a real cluster: the accelerator's step time and the parameters
charged (``cost.step_time_s``, ``cost.charged_params``), checked against hand computations."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from easgd.config.algorithm import AlgorithmConfig
from easgd.config.schema import CostConfig, ModelConfig
from easgd.sim.cost import ring_allreduce_time
from easgd.topologies.simulate import build_simulation
from tests.test_simulate_mode import small_config

PROFILES = Path(__file__).resolve().parents[1] / "configs" / "cost"
RESNET50 = 25_557_032


def test_a_25m_parameter_model_on_10gbe_with_50ms_steps(tmp_path: Path) -> None:
    """By hand: one message is 25,557,032 x 4 + 64 = 102,228,192 bytes = 817,825,536 bits;
    at 10 Gb/s that is 81.7825536 ms = 1.635651072 steps of 50 ms. Latency 25 us = 0.0005
    steps, service 100 us = 0.002 steps. The simulated model keeps its own size."""
    cost = CostConfig(
        name="hand", latency_us=25.0, bandwidth_gbps=10.0, service_us=100.0,
        step_time_s=0.05, charged_params=RESNET50,
    )  # fmt: skip
    cfg = small_config(tmp_path, cost=cost, workers=4)
    simulator, figures = build_simulation(cfg)
    charges = figures.charges
    assert figures.charged_params == RESNET50 and figures.step_time_s == 0.05
    assert charges.transfer == pytest.approx(1.635651072, rel=1e-12)
    assert charges.latency == pytest.approx(0.0005, rel=1e-12)
    assert charges.service == pytest.approx(0.002, rel=1e-12)
    assert charges.round_trip == pytest.approx(2 * (0.0005 + 1.635651072) + 0.002, rel=1e-12)
    assert simulator.sim.cost == charges
    assert simulator.objective.flat.num_params < 10_000  # type: ignore[attr-defined]


def test_without_charged_params_the_simulated_model_is_charged(tmp_path: Path) -> None:
    cost = CostConfig(name="hand", bandwidth_gbps=1.0, service_us=0.0, step_time_s=1e-3)
    _, figures = build_simulation(small_config(tmp_path, cost=cost))
    # MLP 64-16-10 on digits: 64*16 + 16 + 16*10 + 10 = 1210 parameters -> 4904 bytes
    assert figures.charged_params == 1210
    assert figures.charges.transfer == pytest.approx(4904 * 8 / 1e9 / 1e-3, rel=1e-12)


def test_an_allreduce_round_charges_the_stated_model(tmp_path: Path) -> None:
    """Synchronous (topology=allreduce): a ring all-reduce of 25.6M parameters among 4 ranks on
    10 GbE, 2 (p - 1) = 6 latencies and 6/4 transfers: 6 x 0.0005 + 1.5 x 1.635651072 steps."""
    cost = CostConfig(
        name="hand", latency_us=25.0, bandwidth_gbps=10.0, service_us=0.0,
        step_time_s=0.05, charged_params=RESNET50,
    )  # fmt: skip
    cfg = small_config(
        tmp_path, cost=cost, workers=4, topology="allreduce",
        algorithm=AlgorithmConfig("easgd", learning_rate=0.1),
    )  # fmt: skip
    simulator, figures = build_simulation(cfg)
    expected = 6 * 0.0005 + 1.5 * 1.635651072
    assert ring_allreduce_time(figures.charges, 4) == pytest.approx(expected, rel=1e-12)
    assert simulator._round_time == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("name", "bandwidth", "latency_us", "step", "params", "transfer_steps"),
    [
        # bits = (params * 4 + 64) * 8; transfer steps = bits / (Gb/s * 1e9) / step
        ("paper_cluster", 54.5, 2.0, 0.025, 1_155_018, (1_155_018 * 4 + 64) * 8 / 54.5e9 / 0.025),
        ("gpu8_pcie", 252.0, 5.0, 0.05, RESNET50, 102_228_192 * 8 / 252e9 / 0.05),
        ("cluster_10gbe", 10.0, 25.0, 0.05, RESNET50, 1.635651072),
        ("cross_datacenter", 1.0, 30_000.0, 0.05, RESNET50, 16.35651072),
    ],
)
def test_named_cluster_profiles_state_their_numbers_and_sources(
    tmp_path: Path,
    name: str,
    bandwidth: float,
    latency_us: float,
    step: float,
    params: int,
    transfer_steps: float,
) -> None:
    raw = yaml.safe_load((PROFILES / f"{name}.yaml").read_text())
    text = (PROFILES / f"{name}.yaml").read_text()
    assert raw["name"] == name and raw["source"] and text.count("\n#") >= 5  # sources in comments
    raw["service_us"] = 0.0  # not timed in a unit test
    cost = CostConfig(**raw)
    assert (cost.bandwidth_gbps, cost.latency_us, cost.step_time_s, cost.charged_params) == (
        bandwidth, latency_us, step, params,
    )  # fmt: skip
    cfg = small_config(tmp_path, cost=cost, model=ModelConfig(name="mlp", hidden=[8]))
    _, figures = build_simulation(cfg)
    assert figures.charges.transfer == pytest.approx(transfer_steps, rel=1e-12)
    assert figures.charges.latency == pytest.approx(latency_us * 1e-6 / step, rel=1e-12)


def test_charged_params_must_be_a_positive_integer() -> None:
    with pytest.raises(
        ValueError, match="cost.charged_params=0; allowed: an integer >= 1, or null"
    ):
        CostConfig(charged_params=0)
    with pytest.raises(ValueError, match="cost.charged_params"):
        CostConfig(charged_params=2.5)  # type: ignore[arg-type]
