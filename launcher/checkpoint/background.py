"""Checkpoints written while training goes on (``ckpt.async``): a snapshot in host memory, then a thread writes it.

The step loop waits only for the snapshot (a copy of every tensor into host memory: pinned buffers on CUDA, reused
from one save to the next). Writing, fsync, the atomic rename, ``best`` and pruning happen in the thread; at most one
write is in flight, and a failure is told at the next agreement on a checkpoint, on every rank at once.
"""

from __future__ import annotations

import threading
from typing import Callable

import torch
from torch.utils._pytree import tree_map

from launcher.errors import LauncherError


class BackgroundWrite:
    """One checkpoint being written by a thread of its own."""

    def __init__(self, write: Callable[[], None], name: str):
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, args=(write,), name=f"launcher-checkpoint {name}",
                                        daemon=True)  # a process that ends kills it: the write stays unpublished
        self._thread.start()

    def _run(self, write: Callable[[], None]) -> None:
        try:
            write()
        except LauncherError as error:
            self.error = str(error)
        except BaseException as error:  # the thread's end is the only place left to catch it
            self.error = f"{type(error).__name__}: {error}".splitlines()[0]

    def wait(self) -> str | None:
        """Wait for the write to end; its failure's message, or None."""
        self._thread.join()
        return self.error


class Snapshots:
    """Copies of state trees in host memory, into buffers kept for the next snapshot (pinned for CUDA tensors).

    Kept, the buffers cost no page faults from the second save on (fresh memory for a 768 MB state takes a third of
    the copy's time); they hold the state's size of host memory all run. Reuse is safe because a snapshot is taken
    only once the write of the one before has ended.
    """

    def __init__(self):
        self._buffers: list[torch.Tensor] = []

    def take(self, tree):
        """``tree`` with every tensor copied to host memory (waits for the copies)."""
        buffers, used, on_cuda = self._buffers, [0], False

        def copy(value):
            nonlocal on_cuda
            if not isinstance(value, torch.Tensor):
                return value
            value = value.detach()
            pinned = value.device.type == "cuda"
            on_cuda |= pinned
            index = used[0]
            used[0] += 1
            if index == len(buffers):
                buffers.append(torch.empty(0))
            if buffers[index].shape != value.shape or buffers[index].dtype != value.dtype:
                buffers[index] = torch.empty(value.shape, dtype=value.dtype, pin_memory=pinned)
            return buffers[index].copy_(value, non_blocking=pinned)

        copied = tree_map(copy, tree)
        if on_cuda:
            torch.cuda.synchronize()
        return copied
