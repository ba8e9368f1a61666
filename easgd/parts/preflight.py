"""Cheap checks run before any process starts: dataset files present, custom targets importable.

Parsing stays with the loaders (each rank parses its own copy); this only makes the common
mistakes fail in the launching shell with one clear line instead of in p + 1 child processes.
"""

from __future__ import annotations

from easgd.config.schema import TrainConfig
from easgd.parts.build import import_object


def preflight(cfg: TrainConfig) -> None:
    """Raise ValueError naming the missing file or import and the fix."""
    data = cfg.data
    if data.name == "mnist":
        from easgd.data.mnist import mnist_files

        assert data.root is not None
        mnist_files(data.root)
    elif data.name == "cifar10":
        from easgd.data.cifar10 import cifar10_folder

        assert data.root is not None
        cifar10_folder(data.root)
    elif data.name == "custom":
        assert data.target is not None
        import_object(data.target)
    if cfg.model.name == "custom":
        assert cfg.model.target is not None
        import_object(cfg.model.target)
