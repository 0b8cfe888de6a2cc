"""A DistributedSampler that can start an epoch part-way through, for exact mid-epoch resume."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, DistributedSampler


class ResumableDistributedSampler(DistributedSampler):
    """Shuffles like DistributedSampler (a permutation seeded by seed + epoch) and keeps whole global batches only.

    Rank r takes every world-size-th index of the epoch's order, so a global batch is the same set of samples on
    any number of processes. ``set_epoch(epoch, consumed)`` leaves out the first ``consumed`` samples of that
    order: a resumed epoch continues with exactly the samples not yet seen, in the same order.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int, global_batch: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.usable = len(dataset) // global_batch * global_batch  # samples in the epoch's full global batches
        self.consumed = 0

    def set_epoch(self, epoch: int, consumed: int = 0) -> None:
        super().set_epoch(epoch)
        self.consumed = consumed

    def __iter__(self):
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.dataset), generator=generator)[: self.usable]
        return iter(order[self.consumed + self.rank :: self.num_replicas].tolist())

    def __len__(self) -> int:
        return (self.usable - self.consumed) // self.num_replicas
