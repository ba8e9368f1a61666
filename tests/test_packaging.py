"""A built wheel carries its configs: installed (not editable) into a fresh venv, the trainer's help,
its config errors and the main job work from an empty folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
# what the wheel is built from (copied out, so the build writes nothing into the repository)
SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "easgd", "configs")
WORKERS, STEPS = 4, 200  # the main job's 4 workers, with fewer steps


def run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run without PYTHONPATH, so only what the interpreter itself installs is imported."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def checked(args: list[str], cwd: Path) -> str:
    """``run`` that fails the test, with the output, on a non-zero exit; returns stdout."""
    result = run(args, cwd)
    assert result.returncode == 0, (args, result.stdout[-3000:], result.stderr[-3000:])
    return result.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from a copy of this checkout's sources."""
    work = tmp_path_factory.mktemp("build")
    (work / "src").mkdir()
    for name in SOURCES:
        source = ROOT / name
        if source.is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
            shutil.copytree(source, work / "src" / name, ignore=ignore)
        else:
            shutil.copy2(source, work / "src" / name)
    pip = [sys.executable, "-m", "pip"]
    checked(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "./src", "-w", "dist"],
        work,
    )
    (built,) = (work / "dist").glob("easgd-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path) -> Path:
    """A fresh venv that sees this environment's torch and the other dependencies, with the wheel
    installed into it (``--ignore-installed``: pip never touches an easgd installed outside it)."""
    root = wheel.parent.parent / "venv"
    checked(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(root)],
        wheel.parent,
    )
    python = root / "bin" / "python"
    install = ["install", "--no-deps", "--no-index", "--ignore-installed", str(wheel)]
    checked([str(python), "-m", "pip", *install], wheel.parent)
    return root


@pytest.fixture()
def empty(tmp_path: Path) -> Path:
    """An empty folder to run in: no configs/ and no easgd/ next to it."""
    folder = tmp_path / "empty"
    folder.mkdir()
    return folder


def options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONFIGS / group).glob("*.yaml"))


def test_the_wheel_carries_every_config_file(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        shipped = {name for name in archive.namelist() if name.startswith("easgd/configs/")}
        assert archive.read("easgd/configs/config.yaml") == (CONFIGS / "config.yaml").read_bytes()
    expected = {f"easgd/configs/{path.relative_to(CONFIGS)}" for path in CONFIGS.rglob("*.yaml")}
    assert shipped == expected


def test_the_installed_package_is_the_venvs_and_reads_its_own_configs(
    venv: Path, empty: Path
) -> None:
    code = "import easgd; from easgd.config.store import config_dir; print(easgd.__file__); print(config_dir())"
    module, configs = checked([str(venv / "bin" / "python"), "-c", code], empty).split()
    site = next((venv / "lib").glob("python3*/site-packages")).resolve()
    assert Path(module).resolve() == site / "easgd" / "__init__.py"
    assert Path(configs).resolve() == site / "easgd" / "configs"


def test_help_lists_the_config_groups_and_their_options(venv: Path, empty: Path) -> None:
    help_text = checked([str(venv / "bin" / "python"), "-m", "easgd.train", "--help"], empty)
    groups = help_text.split("== Configuration groups ==")[1].split("== Config ==")[0]
    lines = dict(line.split(": ", 1) for line in groups.splitlines() if ": " in line)
    for group in ("algorithm", "comm", "cost", "data", "experiment", "model"):
        assert set(lines[group].split(", ")) == set(options(group)), group
    assert list(empty.iterdir()) == []


def test_an_unknown_experiment_exits_non_zero_naming_the_options(venv: Path, empty: Path) -> None:
    result = run([str(venv / "bin" / "python"), "-m", "easgd.train", "experiment=nosuch"], empty)
    assert result.returncode != 0
    assert "Could not find 'experiment/nosuch'" in result.stderr
    listed = result.stderr.split("Available options in 'experiment':")[1].split("Config search")[0]
    assert sorted(listed.split()) == options("experiment")
    assert list(empty.iterdir()) == []  # failed at composition: no run folder, no process


def test_the_main_job_runs_from_an_empty_folder(venv: Path, empty: Path) -> None:
    overrides = [f"steps_per_worker={STEPS}", "progress=false", "tensorboard=false"]
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORKERS + 1}"]
    checked([str(venv / "bin" / "python"), *launch, "-m", "easgd.train", *overrides], empty)
    (summary_file,) = [
        p for p in (empty / "runs").glob("*/summary.json") if p.parent.name != "latest"
    ]
    assert (empty / "runs" / "latest").resolve() == summary_file.parent.resolve()
    summary = json.loads(summary_file.read_text())
    assert summary["workers"] == WORKERS and summary["steps_per_worker"] == STEPS
    assert summary["worker_steps"] == WORKERS * STEPS and summary["stop_reason"] == "steps"
    assert [path.name for path in empty.iterdir()] == ["runs"]
