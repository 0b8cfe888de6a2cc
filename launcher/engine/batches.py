"""Batches of any structure: tensors, tuples, lists, dicts, nested, with non-tensor leaves left as they are."""

from __future__ import annotations

from typing import Any, Callable

import torch


def to_device(batch: Any, device: torch.device, prepare: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``batch`` with every tensor moved to ``device`` and passed through ``prepare``.

    The copy is asynchronous from pinned memory, and ``prepare`` makes image tensors channels_last; the batch's
    structure, and every other leaf, is kept.
    """
    if isinstance(batch, torch.Tensor):
        return prepare(batch.to(device, non_blocking=True))
    if isinstance(batch, dict):
        return type(batch)((key, to_device(value, device, prepare)) for key, value in batch.items())
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(to_device(value, device, prepare) for value in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(value, device, prepare) for value in batch)
    return batch


def first_tensor(batch: Any) -> torch.Tensor | None:
    """The first tensor in ``batch``'s structure (dicts in their order), or None."""
    if isinstance(batch, torch.Tensor):
        return batch
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else ()
    for value in values:
        found = first_tensor(value)
        if found is not None:
            return found
    return None


def batch_size(batch: Any) -> int:
    """The number of samples in ``batch``: its first tensor's first dimension."""
    tensor = first_tensor(batch)
    if tensor is None or tensor.dim() == 0:
        raise TypeError("a batch needs a tensor with a batch dimension")
    return tensor.shape[0]


def tensors_in(batch: Any):
    """Every tensor in ``batch``'s structure."""
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, (dict, tuple, list)):
        for value in batch.values() if isinstance(batch, dict) else batch:
            yield from tensors_in(value)


def prefetched(batches, device: torch.device, prepare: Callable[[torch.Tensor], torch.Tensor]):
    """``batches`` on ``device``.

    On CUDA the next batch is copied (from pinned memory, on a side stream) while the step on the current one runs,
    instead of before it; elsewhere they are moved as they come.
    """
    if device.type != "cuda":
        for batch in batches:
            yield to_device(batch, device, prepare)
        return
    side, main = torch.cuda.Stream(device), torch.cuda.current_stream(device)
    pending = None
    for batch in batches:
        side.wait_stream(main)  # a batch made on the device (resident data) is complete before the side reads it
        with torch.cuda.stream(side):
            moved = to_device(batch, device, prepare)
        if pending is not None:
            yield pending  # the step on it is queued before the copy above is waited for
        main.wait_stream(side)
        for tensor in tensors_in(moved):
            tensor.record_stream(main)  # allocated on the side stream, used on the main one
        pending = moved
    if pending is not None:
        yield pending
