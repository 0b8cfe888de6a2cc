"""The order a rank draws its samples in, and the random numbers each sample draws.

The order resumes mid-epoch; a sample's random numbers depend on which sample it is and in which epoch, not on
which process draws it.
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

_MASK = 2**64 - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A seed for sample ``index`` in ``epoch`` (splitmix64 of the three): far apart for neighbouring samples."""
    value = ((seed * 0x9E3779B97F4A7C15 + epoch) * 0x9E3779B97F4A7C15 + index) & _MASK
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK
    return (value ^ (value >> 31)) & (2**63 - 1)


# Beyond this many samples an epoch's order is computed as it is read instead of held: a randperm takes 8 bytes a
# sample (a corpus of 400 million token windows would need 3 GB for its order alone).
EAGER_ORDER_UP_TO = 2**24
_CHUNK = 2**16  # samples placed at once in a lazy order


class Permutation:
    """A pseudo-random permutation of ``range(n)`` chosen by ``key``, computed for any positions without the whole.

    A four-round Feistel network on the smallest even number of bits that holds ``n``, walking the cycle until the
    value falls below ``n``: a bijection, so each sample comes exactly once.
    """

    def __init__(self, n: int, key: int):
        bits = max(2, (n - 1).bit_length())
        self.n, self.half = n, (bits + bits % 2) // 2
        self.mask = (1 << self.half) - 1
        self.keys = [sample_seed(key, 0, round_) & self.mask for round_ in range(4)]

    def __call__(self, positions: torch.Tensor) -> torch.Tensor:
        values = self._rounds(positions)
        while bool((outside := values >= self.n).any()):
            values[outside] = self._rounds(values[outside])
        return values

    def _rounds(self, values: torch.Tensor) -> torch.Tensor:
        left, right = values >> self.half, values & self.mask
        for key in self.keys:  # int64 products wrap around; the mask keeps the low bits, which are all they need
            left, right = right, left ^ (((right * 0x9E3779B1 + key) ^ (right >> 7)) & self.mask)
        return (left << self.half) | right


class ResumableDistributedSampler(DistributedSampler):
    """Shuffles like DistributedSampler (a permutation seeded by seed + epoch), keeping whole global batches only.

    Rank r takes every world-size-th index of the epoch's order, so a global batch is the same set of samples on
    any number of processes. ``set_epoch(epoch, consumed)`` leaves out the first ``consumed`` samples of that
    order: a resumed epoch continues with exactly the samples not yet seen, in the same order. With ``seeded`` it
    yields ``(index, seed)`` pairs for ``SeededSamples``. Above ``EAGER_ORDER_UP_TO`` samples the order is a
    ``Permutation``, computed chunk by chunk: memory stays flat however large the data set.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int, global_batch: int,
                 seeded: bool = False):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.usable_samples = len(dataset) // global_batch * global_batch  # in the epoch's full global batches
        self.consumed, self.seeded = 0, seeded

    def set_epoch(self, epoch: int, consumed: int = 0) -> None:
        super().set_epoch(epoch)
        self.consumed = consumed

    def _chunks(self):
        """This rank's remaining indices of the epoch, as tensors."""
        first, step = self.consumed + self.rank, self.num_replicas
        if len(self.dataset) <= EAGER_ORDER_UP_TO:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            yield torch.randperm(len(self.dataset), generator=generator)[: self.usable_samples][first::step]
            return
        order = Permutation(len(self.dataset), self.seed * 1_000_003 + self.epoch)
        for start in range(first, self.usable_samples, _CHUNK * step):
            yield order(torch.arange(start, min(start + _CHUNK * step, self.usable_samples), step))

    def index_batches(self, batch_size: int):
        """This rank's remaining indices in batches of ``batch_size`` (an incomplete last one dropped)."""
        pending = torch.empty(0, dtype=torch.int64)
        for chunk in self._chunks():
            pending = torch.cat([pending, chunk])
            whole = len(pending) // batch_size * batch_size
            yield from pending[:whole].split(batch_size)
            pending = pending[whole:]

    def __iter__(self):
        for chunk in self._chunks():
            if not self.seeded:
                yield from chunk.tolist()
            else:
                yield from ((index, sample_seed(self.seed, self.epoch, index)) for index in chunk.tolist())

    def __len__(self) -> int:
        return (self.usable_samples - self.consumed) // self.num_replicas


def seed_globals(seed: int) -> None:
    """Seed torch's (CPU), Python's and NumPy's global random generators: what a sample's transforms draw from."""
    torch.default_generator.manual_seed(seed)  # the CPU's: torch.manual_seed also seeds CUDA, far slower
    random.seed(seed)
    np.random.seed(seed % 2**32)


@contextlib.contextmanager
def globals_kept():
    """Run the block on the global random generators, then put them back as they were."""
    saved = torch.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        torch.set_rng_state(saved[0])
        random.setstate(saved[1])
        np.random.set_state(saved[2])


class SeededSamples(Dataset):
    """``dataset``, each sample read with the global random generators seeded for it.

    Keys are the ``(index, seed)`` pairs of a seeded sampler. A transform that draws random numbers (a random crop,
    a flip) then draws the same ones for a sample in the same epoch whichever process reads it (a DataLoader worker,
    or the training process), after any resume, on any number of processes or workers: nothing about the workers
    needs saving. A batch is read with the generators put back after it (``__getitems__``, which the DataLoader
    calls): in the training process they are the model's (dropout), which data loading must not move.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self.batch_seed = 0  # the last batch's: what its collation draws from (SeededCollate)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        seed_globals(seed)
        return self.dataset[index]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list:
        self.batch_seed = sample_seed(keys[0][1], 0, len(keys)) if keys else 0  # another stream than its samples'
        with globals_kept():
            return [self[key] for key in keys]


class SeededCollate:
    """A recipe's ``collate``, run with the global generators seeded by the batch it collates (MixUp, CutMix).

    The batch is the one ``samples`` (a ``SeededSamples``) read last: the DataLoader collates each batch right after
    reading it, in the same process.
    """

    def __init__(self, collate, samples: SeededSamples):
        self.collate, self.samples = collate, samples

    def __call__(self, batch: list):
        with globals_kept():
            seed_globals(self.samples.batch_seed)
            return self.collate(batch)
