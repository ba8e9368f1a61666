"""The documented shape of summary.json (README "Outputs", easgd/parts/summary.py), written out.

Every real run in the suite that writes a summary checks it here, so each topology and mode is
held to the same shape: exactly these top-level keys with these types, and the topology's own
keys under ``details``. The lists are written from the documentation, not read from the code.
"""

from __future__ import annotations

import math
from typing import Any

TOP_LEVEL: dict[str, tuple[type, ...]] = {
    "schema": (int,),
    "topology": (str,),
    "mode": (str,),
    "algorithm": (str,),
    "workers": (int,),
    "comm_period": (int, type(None)),
    "steps_per_worker": (int, type(None)),
    "num_params": (int,),
    "wall_time_s": (float, int),
    "worker_steps": (int,),
    "exchanges": (int,),
    "server_updates": (int,),
    "exchanges_per_s": (float, int),
    "test_loss": (float,),
    "test_error": (float,),
    "stop_reason": (str,),
    "restarts": (int,),
    "resumed_worker_steps": (dict,),
    "resumed_exchanges": (int,),
    "failed_workers": (dict,),
    "learning_rate": (float, int, type(None)),
    "momentum": (float, int, type(None)),
    "moving_rate": (float, type(None)),
    "dataset": (str, type(None)),
    "model": (str, type(None)),
    "latency_ms": (float, int, type(None)),
    "jitter_ms": (float, int, type(None)),
    "seed": (int, type(None)),
    "config": (dict, type(None)),
    "details": (dict,),
}

DETAILS = {
    "server": {
        "shards",
        "rejected_messages",
        "worker_steps_per_s",
        "redone_worker_steps",
        "redone_steps_by_worker",
        "committed_snapshot",
        "membership",
    },
    "allreduce": {
        "steps_per_s_rank0",
        "mean_allreduce_ms",
        "resumed_step",
        "worker_drift",
        "center_update_norm",
    },
    "sequential": {"train_loss", "train_error"},
    "own_loop": {
        "rejected_messages",
        "worker_steps_per_s",
        "hparams",
        "committed_snapshot",
        "resumed_snapshot",
        "redone_steps_by_worker",
        "membership",
    },
    "simulate": {
        "clock",
        "cost_profile",
        "step_time_s",
        "link_latency_s",
        "bandwidth_gbps",
        "service_s",
        "charged_params",
        "charges_in_steps",
        "simulation_s",
        "batched",
    },
}


def assert_summary_shape(
    summary: dict[str, Any], *, topology: str, mode: str = "distributed"
) -> None:
    """Fail unless ``summary`` has the documented shape of a ``topology`` run in ``mode``."""
    assert set(summary) == set(TOP_LEVEL), (
        f"missing {sorted(set(TOP_LEVEL) - set(summary))}, "
        f"unexpected {sorted(set(summary) - set(TOP_LEVEL))}"
    )
    for key, types in TOP_LEVEL.items():
        value = summary[key]
        assert isinstance(value, types) and not isinstance(value, bool), (key, value)
    assert summary["schema"] == 2
    assert summary["topology"] == topology and summary["mode"] == mode
    details = DETAILS["simulate" if mode == "simulate" else topology]
    assert set(summary["details"]) == details, sorted(summary["details"])
    if topology == "server" and mode == "distributed":
        membership = summary["details"]["membership"]
        assert membership["mode"] in ("fixed", "elastic"), membership
        if membership["mode"] == "elastic":  # every departure is counted once, with its slot
            assert len(membership["departures"]) == membership["members_left"]
            assert len(membership["rejoin_s"]) <= membership["members_left"]
    rate = (summary["exchanges"] - summary["resumed_exchanges"]) / max(summary["wall_time_s"], 1e-9)
    assert math.isclose(summary["exchanges_per_s"], rate, rel_tol=1e-9)
    if summary["config"] is not None:  # easgd.train runs: the config agrees with the record
        assert summary["config"]["algorithm"]["name"] == summary["algorithm"]
        assert summary["config"]["seed"] == summary["seed"]
