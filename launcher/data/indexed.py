"""Batches cut at once by indexing, instead of read and collated sample by sample.

A data set that can hand over a whole batch by indexing (a TensorDataset, token windows) has its batches cut in the
training process by the sampler's indices, on the device where it fits (``data.resident``).

A DataLoader batch of a TensorDataset is ``default_collate`` of ``dataset[i]`` for the sampler's indices, which is
``tensor[indices]`` for each of its tensors: the same values, so the same weights, on any number of processes and
after a resume. What it saves is the per-sample Python of the DataLoader (its reads and collation), and on a GPU
the copy to the device every step.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, TensorDataset

from launcher.errors import UserError

SOURCE = ("take", "to", "nbytes", "device")  # what a data set needs to cut its batches at once


class IndexedTensors:
    """A TensorDataset's tensors as an indexed source: ``take(indices)`` is each tensor at those indices."""

    def __init__(self, tensors: tuple[torch.Tensor, ...]):
        self.tensors = tensors

    @property
    def nbytes(self) -> int:
        return sum(tensor.nbytes for tensor in self.tensors)

    @property
    def device(self) -> torch.device:
        return self.tensors[0].device

    def to(self, device: torch.device) -> IndexedTensors:
        return IndexedTensors(tuple(tensor.to(device) for tensor in self.tensors))

    def take(self, indices: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(tensor[indices] for tensor in self.tensors)


def indexed(dataset: Dataset):
    """``dataset`` as a source that cuts batches at once, or None if it cannot.

    A source has ``take(indices)`` (the batch of those samples, on its device), ``to(device)`` (itself there),
    ``nbytes`` and ``device``: a TensorDataset's tensors, or a data set of the recipe's that has them.
    """
    if isinstance(dataset, TensorDataset):
        return IndexedTensors(dataset.tensors)
    return dataset if all(hasattr(dataset, name) for name in SOURCE) else None


def indexed_source(dataset: Dataset, cfg, device: torch.device, which: str, collate):
    """Where ``dataset``'s batches are cut (``data.resident``): an indexed source on ``device``, or None.

    None means a DataLoader reads them sample by sample. ``auto`` cuts batches at once wherever the data set can
    (and the recipe has no ``collate`` of its own): on a GPU when the data take at most ``data.resident_share`` of
    its memory (else a DataLoader), on a CPU always (its memory is the host's: cutting is faster than reading and
    collating sample by sample, BENCHMARKS.md).
    """
    mode = cfg.data.resident
    if mode == "never":
        return None
    source = indexed(dataset) if collate is None else None
    if source is None:
        if mode == "always":
            why = "the recipe collates its own batches (collate)" if collate else \
                f"the recipe gives a {type(dataset).__name__}"
            raise UserError(f"data.resident=always needs the {which} set to cut whole batches (a TensorDataset, or "
                            f"a data set with {', '.join(SOURCE)}), but {why}: set data.resident=auto or never",
                            same_on_all_ranks=True)
        return None
    if mode == "auto" and device.type == "cuda":
        if source.nbytes > cfg.data.resident_share * torch.cuda.get_device_properties(device).total_memory:
            return None
    return source.to(device)


class IndexedLoader:
    """A loader of batches cut from an indexed source.

    It has what the engine asks of a DataLoader (iteration, ``len``, ``dataset``, ``sampler``, ``generator``).
    ``batches``: lists of indices (evaluation), or None to take ``batch_size`` consecutive indices of the sampler's
    order, dropping an incomplete last batch (training).
    """

    def __init__(self, dataset: Dataset, source, batch_size: int = 0, sampler=None,
                 batches: list[list[int]] | None = None):
        self.dataset, self.source, self.batch_size = dataset, source, batch_size
        self.sampler, self.batches = sampler, batches
        self.generator = torch.Generator()  # seeded by start_epoch like a DataLoader's; nothing draws from it

    def __iter__(self):
        batches = (torch.tensor(batch) for batch in self.batches) if self.batches is not None else \
            self.sampler.index_batches(self.batch_size)
        for indices in batches:
            yield self.source.take(indices.to(self.source.device, non_blocking=True))

    def __len__(self) -> int:
        return len(self.batches) if self.batches is not None else len(self.sampler) // self.batch_size

