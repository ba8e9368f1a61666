"""Build hook: the wheel ships the repository's top-level ``configs/`` as ``easgd/configs/``.

All metadata is in pyproject.toml. ``configs/`` stays at the top level of the repository (the
design's layout) and is copied into the built package, where ``easgd.config.store.config_dir``
finds it, so an installed (non-editable) ``easgd.train`` composes the same configs as a checkout.
An editable install skips the copy: it reads the top-level folder directly.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CONFIGS = Path(__file__).resolve().parent / "configs"


class BuildPyWithConfigs(build_py):
    """``build_py`` that also copies ``configs/**/*.yaml`` to ``<build_lib>/easgd/configs/``."""

    def run(self) -> None:
        """Build the packages, then add the configs (not for an editable install)."""
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "easgd" / "configs"
        for source in sorted(CONFIGS.rglob("*.yaml")):
            destination = target / source.relative_to(CONFIGS)
            self.mkpath(str(destination.parent))
            self.copy_file(str(source), str(destination))


setup(cmdclass={"build_py": BuildPyWithConfigs})
