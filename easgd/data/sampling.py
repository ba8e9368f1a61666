"""Minibatch sampling for one worker: the whole training set with its own seed, or a disjoint shard."""

from __future__ import annotations

import torch
from torch import Tensor

from easgd.data.split import Split


class MinibatchSampler:
    """Draws minibatches (with replacement) for worker ``worker_index`` of ``num_workers``.

    ``whole`` (the paper's setting): every worker samples the full training set with its own seed.
    ``shard``: worker k samples only the examples k, k + p, k + 2p, ... of the training set.
    """

    def __init__(
        self,
        split: Split,
        *,
        batch_size: int,
        worker_index: int,
        num_workers: int,
        mode: str = "whole",
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        if mode not in ("whole", "shard"):
            raise ValueError(f"data.sampling={mode!r}; allowed: whole, shard")
        index = torch.arange(len(split.train_y))
        if mode == "shard":
            index = index[worker_index::num_workers]
            if len(index) == 0:
                raise ValueError(
                    f"data.sampling=shard leaves worker {worker_index} no examples "
                    f"({len(split.train_y)} examples for {num_workers} workers)"
                )
        self.inputs = split.train_x[index].to(device)
        self.targets = split.train_y[index].to(device)
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed * 1_000_003 + worker_index)

    def __len__(self) -> int:
        return len(self.targets)

    def sample(self) -> tuple[Tensor, Tensor]:
        """One minibatch (inputs, targets)."""
        pick = torch.randint(len(self.targets), (self.batch_size,), generator=self.generator)
        pick = pick.to(self.inputs.device)
        return self.inputs[pick], self.targets[pick]
