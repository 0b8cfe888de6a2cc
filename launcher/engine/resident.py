"""Data on the device (``data.resident``): an in-memory data set copied to the device once.

The data set is a TensorDataset; each rank's batches are formed there by indexing, in exactly the order the DataLoader
path would give them.

A DataLoader batch of a TensorDataset is ``default_collate`` of ``dataset[i]`` for the sampler's indices, which is
``tensor[indices]`` for each of its tensors: the same values, so the same weights, on any number of processes and
after a resume. What it saves is the per-sample Python of the DataLoader and the copy to the device every step.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, TensorDataset

from launcher.errors import UserError


def resident_tensors(dataset: Dataset, cfg, device: torch.device, which: str) -> tuple[torch.Tensor, ...] | None:
    """``dataset``'s tensors on ``device`` when ``data.resident`` says so, else None.

    ``auto`` says so for a TensorDataset on a GPU whose tensors take at most ``data.resident_share`` of its memory. None
    means the DataLoader path.
    """
    mode = cfg.data.resident
    if mode == "never":
        return None
    if not isinstance(dataset, TensorDataset):
        if mode == "always":
            raise UserError(f"data.resident=always needs the {which} set as a torch TensorDataset (in memory); the "
                            f"recipe gives a {type(dataset).__name__}: set data.resident=auto or never",
                            same_on_all_ranks=True)
        return None
    if mode == "auto":
        if device.type != "cuda":
            return None  # on a CPU the DataLoader path costs about the same (no copy to save)
        size = sum(tensor.nbytes for tensor in dataset.tensors)
        if size > cfg.data.resident_share * torch.cuda.get_device_properties(device).total_memory:
            return None
    return tuple(tensor.to(device) for tensor in dataset.tensors)


class ResidentLoader:
    """What the engine asks of a DataLoader, over tensors already on the device.

    That is iteration, ``len``, ``sampler``, ``dataset`` and ``generator``. ``batches``: lists of indices (evaluation),
    or None to take ``batch_size`` consecutive indices of the sampler's order, dropping an incomplete last batch
    (training).
    """

    def __init__(self, dataset: Dataset, tensors: tuple[torch.Tensor, ...], batch_size: int = 0, sampler=None,
                 batches: list[list[int]] | None = None):
        self.dataset, self.tensors, self.batch_size = dataset, tensors, batch_size
        self.sampler, self.batches = sampler, batches
        self.generator = torch.Generator()  # seeded by start_epoch like a DataLoader's; nothing draws from it

    def _index_batches(self) -> list[torch.Tensor]:
        if self.batches is not None:
            return [torch.tensor(batch) for batch in self.batches]
        order = torch.tensor(list(self.sampler), dtype=torch.int64)
        whole = len(order) // self.batch_size * self.batch_size
        return list(order[:whole].split(self.batch_size))

    def __iter__(self):
        device = self.tensors[0].device
        for indices in self._index_batches():
            indices = indices.to(device, non_blocking=True)
            yield tuple(tensor[indices] for tensor in self.tensors)

    def __len__(self) -> int:
        return len(self.batches) if self.batches is not None else len(self.sampler) // self.batch_size
