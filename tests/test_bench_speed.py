"""The speed benchmarks run in quick mode and their figures say what they promise.

Timings on a shared 2-core machine are too noisy to assert targets on; these tests assert what
is deterministic: both loops compute the same trajectory (so the ratio compares equal work), the
memory per parameter is what the buffers account for, and every promised figure is written.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest

from tests.test_benchmarks import run_quick

pytestmark = pytest.mark.slow


def test_speed_quick(tmp_path: Path) -> None:
    out = run_quick("speed.py", tmp_path)
    assert "local mlp" in out and "eamsgd tau=10 overlap" in out
    result = json.loads((tmp_path / "speed_quick.json").read_text())
    local = {r["model"]: r for r in result["local"]}
    assert set(local) == {"mlp", "lenet", "cifar7"}
    assert 0.9e6 < local["mlp"]["params"] < 1.1e6  # the ~1M-parameter MLP of the issue
    for row in local.values():
        # our worker's look-ahead x + delta v is torch's Nesterov parameter: the same steps ran
        assert row["relative_point_difference"] < 1e-4, row
        assert (
            math.isfinite(row["ratio"])
            and row["ratio_min"] <= row["ratio_median"] <= row["ratio_max"]
        )
    assert [r["run"] for r in result["end_to_end"]] == ["eamsgd tau=10", "eamsgd tau=10 overlap"]
    assert all(r["processes"] == 2 for r in result["end_to_end"])  # <= cores on the CI machine
    memory = result["memory"]
    # params + grads (as the plain loop) + x and v + one receive buffer = 20 bytes/param, plus
    # the activations of one minibatch and allocator slack (26.2 seen in one CI-machine run); the
    # plain loop needs its 16 (momentum + a temporary)
    assert 18 <= memory["worker_bytes_per_param"] <= 28, memory
    assert 12 <= memory["plain_bytes_per_param"] <= 20, memory
    assert (tmp_path / "speed_quick.png").stat().st_size > 10_000


def test_server_capacity_quick(tmp_path: Path) -> None:
    run_quick("server_capacity.py", tmp_path)
    result = json.loads((tmp_path / "server_capacity_quick.json").read_text())
    cells = {(r["workers"], r["params"], r["format"]) for r in result["exchanges"]}
    formats = ("none", "none-whole", "bf16", "int8")
    assert cells == {(p, 10**6, name) for p in (1, 2) for name in formats}
    for row in result["exchanges"]:
        # ratios per repetition, alternating with raw gloo: the median lies above the least
        assert 0 < row["ratio_min"] <= row["ratio_median"] and row["ours_Mparams_per_s"] > 0
        assert row["met"] == ""  # the targets are set at 10M and 25M parameters
    (update,) = result["update"]
    # in place (one pass, no allocation) beats the allocating pure form by a wide margin
    assert update["ratio_median"] > 1.3 * update["pure_ratio"], update
    for row in result["memory"]:
        # the center plus one receive buffer per worker (the reply is written into it)
        assert row["needed"] - 1.5 <= row["bytes_per_param"] <= row["needed"] + 1.5, row
    assert (tmp_path / "server_capacity_quick.png").stat().st_size > 10_000


@pytest.mark.skipif(
    os.geteuid() != 0 or not (shutil.which("ip") and shutil.which("tc")),
    reason="the shaped link needs root and the ip and tc tools",
)
def test_server_capacity_over_a_shaped_link_is_limited_by_the_link(tmp_path: Path) -> None:
    rate_mbit = 200
    run_quick("server_capacity.py", tmp_path, "--no-loopback", "--rate-mbit", str(rate_mbit),
              "--workers", "1", "--formats", "none", "int8")  # fmt: skip
    result = json.loads((tmp_path / "server_capacity_quick.json").read_text())
    rows = {r["format"]: r for r in result["exchanges"]}
    assert set(rows) == {"none", "int8"}
    assert {r["link"] for r in rows.values()} == {f"tbf {rate_mbit} Mbit/s"}
    (link,) = result["links"].values()
    params, rate, burst = 10**6, link["rate_mbit"] * 1e6 / 8, link["burst_bytes"]

    def most(bytes_per_param: float) -> float:
        """Round trips' parameters per second the link allows, whatever the machine's load: a
        round trip crosses it once each way, one direction at a time, and each message can take
        at most the token bucket's depth at once (the bucket refills while the reply travels the
        other end's link). On loopback raw gloo runs ~100 times faster than this."""
        message = params * bytes_per_param
        return params / (2 * max(message - burst, 0.0) / rate) / 1e6

    for row in rows.values():
        assert row["raw_Mparams_per_s"] <= 1.02 * most(4), row
    assert rows["none"]["ours_Mparams_per_s"] <= 1.02 * most(4), rows["none"]
    # int8 carries 1 + 4/256 bytes per parameter
    assert rows["int8"]["ours_Mparams_per_s"] <= 1.02 * most(1 + 4 / 256), rows["int8"]
