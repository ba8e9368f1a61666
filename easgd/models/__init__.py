"""Models: small classifiers for the built-in datasets, and any nn.Module through Hydra's _target_."""

from easgd.models.mlp import MLP

__all__ = ["MLP"]
