"""Datasets: each loader returns a :class:`Split` of in-memory tensors."""

from easgd.data.digits import load_digits_split
from easgd.data.split import Split, fixed_split

__all__ = ["Split", "fixed_split", "load_digits_split"]
