"""The README's own-loop example runs as written under torchrun."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

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
    assert norm > 0
