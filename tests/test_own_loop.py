"""The README's own-loop example runs as written under torchrun."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from tests.test_train_e2e import ROOT, run

pytestmark = pytest.mark.slow


def test_readme_own_loop_example_runs(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- own-loop-example -->\n```python\n(.*?)```", readme, re.S)
    assert match, "the README lost its own-loop example"
    script = tmp_path / "my_train.py"
    script.write_text(match.group(1))
    result = run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=3",
            str(script),
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    norm = float(re.search(r"center weight norm: ([0-9.]+)", result.stdout).group(1))  # type: ignore[union-attr]
    # the workers fit y = x[:, :2], whose weight [I 0] has norm sqrt(2); the center must have
    # moved most of the way there from the initial weights (what the example starts from)
    torch.manual_seed(0)
    initial = float(torch.nn.Linear(10, 2).weight.norm())
    assert abs(norm - 2**0.5) < 0.5 * abs(initial - 2**0.5)
