"""Models: small classifiers for the built-in datasets, and any nn.Module through ``model.target``."""

from easgd.models.cifar7 import Cifar7
from easgd.models.lenet import LeNet
from easgd.models.mlp import MLP

__all__ = ["MLP", "Cifar7", "LeNet"]
