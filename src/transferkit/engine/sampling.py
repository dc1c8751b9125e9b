"""Samplers whose order depends only on (seed, epoch), so a resumed run sees the same batches."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler


class EpochShuffleSampler(Sampler[int]):
    """A random permutation of ``range(n)`` drawn from ``seed + epoch``; call ``set_epoch`` every epoch.

    Under data parallelism every process draws the same permutation and Accelerate hands each process
    its own share of the batches, so the shards are disjoint.
    """

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n = n
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())

    def __len__(self) -> int:
        return self.n


class NeighbourPairSampler(EpochShuffleSampler):
    """Yields ``(i, j)``: the items in a random order drawn from ``seed + epoch`` (as :class:`EpochShuffleSampler`),
    each with a partner ``j`` drawn uniformly from its row of ``partners`` (an ``(n, k)`` index array) by the same
    generator, so a resumed run sees the same pairs."""

    def __init__(self, partners: Any, seed: int = 0) -> None:
        super().__init__(len(partners), seed)
        self.partners = torch.as_tensor(partners, dtype=torch.long)

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=generator)
        columns = torch.randint(self.partners.shape[1], (self.n,), generator=generator)
        return iter(zip(order.tolist(), self.partners[order, columns].tolist()))
