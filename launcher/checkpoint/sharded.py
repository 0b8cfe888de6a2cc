"""The shards of a folder checkpoint (``dist.strategy=fsdp``): how they are written and read.

With torch.distributed.checkpoint (DCP), every rank writes its own part of the model and optimizer state, and reads back
what its shards need on any number of processes (DCP reshards).

torch.distributed.checkpoint is imported inside the functions, as distributed/strategy.py imports FSDP: a ddp run
never needs it, and every process would pay for the import at startup (BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
import functools
import io
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from launcher.checkpoint.files import DCP_METADATA, read_dcp_metadata
from launcher.errors import LauncherError, described
from launcher.storage import file_size_and_crc32


class ShardsFailed(Exception):
    """DCP could not write or read a folder checkpoint; the message is the first failed rank's error, in one line."""


def save_shards(model: nn.Module, optimizer, folder: Path) -> dict[str, list[int]]:
    """Collective: write this rank's shards of the model and optimizer state into ``folder``.

    Every rank gets the size and CRC-32 of every file written (each rank checksums its own, rank 0 the rest).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    with _one_line_failures():
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder)
    return _file_table(folder)


def save_shards_in_background(model: nn.Module, optimizer, folder: Path, group, stager) -> Callable[[], dict]:
    """Collective: copy this rank's shards into host memory, and start writing them into ``folder`` in a thread.

    DCP's ``async_save``, its collectives on ``group`` (a gloo group of the checkpoints' own: the training's go on
    meanwhile on the default one), its copy made by ``stager`` (None: DCP's own, into fresh host memory). Returns what
    waits for the write and then gives every file's size and CRC-32 (a collective on ``group``, for the thread).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    with _one_line_failures():
        written = dcp.async_save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder,
                                 process_group=group, async_stager=stager)

    def files() -> dict[str, list[int]]:
        with _one_line_failures():
            written.result()
        return _file_table(folder, group)

    return files


def _file_table(folder: Path, group=None) -> dict[str, list[int]]:
    """Collective: the size and CRC-32 of every file in ``folder`` (each rank checksums its own, rank 0 the rest)."""
    rank = dist.get_rank()
    mine = {path.name: file_size_and_crc32(path) for path in folder.glob(f"__{rank}_*")}  # DCP's name for rank's data
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine, group=group)
    files = {name: entry for entries in every for name, entry in entries.items()}
    if rank == 0:
        files.update((path.name, file_size_and_crc32(path)) for path in folder.iterdir() if path.name not in files)
    return files


def check_complete(folder: Path, files: dict[str, list[int]]) -> None:
    """Rank 0, before it publishes ``folder``: every file the ranks wrote is there, whole.

    Where one is not, the ranks do not share a file system (a run.dir on node-local disks), and publishing would keep a
    broken checkpoint.
    """
    for name, (size, _) in files.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            raise LauncherError(
                f"checkpoint {folder}: rank 0 does not see {name} as the rank that wrote it does: run.dir must be on "
                "a file system every node shares, not on node-local disks (nothing was published)")


def load_shards(model: nn.Module, optimizer, folder: Path) -> None:
    """Collective: put the model and optimizer state of ``folder`` back into this rank's shards.

    Optimizer state the checkpoint lacks keeps its fresh value, as a file's ``optimizer.load_state_dict`` leaves it
    to be created: momentum turned on since the checkpoint starts from a zero buffer, which SGD's first step then
    sets to the gradient either way. (The model's entries were checked against the checkpoint before.)
    """
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)  # this rank's shards: what DCP fills in
    state = {"model": model_state, "optimizer": optimizer_state}
    _load(state, folder, allow_partial_load=True)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def _model_entries(folder: Path) -> dict:
    """The model's tensors in ``folder``: name -> DCP's metadata (global size, dtype), read from .metadata alone."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    with open(folder / DCP_METADATA, "rb") as file:
        metadata = read_dcp_metadata(file).state_dict_metadata
    return {key.removeprefix("model."): entry for key, entry in metadata.items()
            if key.startswith("model.") and isinstance(entry, TensorStorageMetadata)}


def saved_shapes(folder: Path) -> dict:
    """The model's parameter and buffer shapes in ``folder``."""
    return {name: tuple(entry.size) for name, entry in _model_entries(folder).items()}


def assembled_weights(folder: Path) -> dict:
    """The whole model's state_dict, assembled from the shards in ``folder`` in this one process, on the CPU."""
    weights = {name: torch.empty(entry.size, dtype=entry.properties.dtype)
               for name, entry in _model_entries(folder).items()}
    _load({"model": weights}, folder, alone=True)  # even where a process group exists: rank 0 may call it alone
    return weights


def _load(state: dict, folder: Path, alone: bool = False, allow_partial_load: bool = False) -> None:
    """``dcp.load``: collective, or in this one process.

    It runs in this one process when ``alone`` or without a process group, and then quietly (DCP warns that it assumes
    so where there is no process group).
    """
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings(), _one_line_failures():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.load(state, storage_reader=_safe_types()[0](folder), no_dist=alone or not dist.is_initialized(),
                 planner=_safe_types()[1](allow_partial_load=allow_partial_load))


@functools.cache
def _safe_types() -> tuple[type, type]:
    """DCP's FileSystemReader and DefaultLoadPlanner, unpickling only what a checkpoint may hold.

    torch's own unpickle a folder's ``.metadata`` and a shard's non-tensor entries (the optimizer's hyperparameters)
    with no limit at all: a forged file would run any code it names. The reader reads the metadata with
    ``read_dcp_metadata``; the planner loads the entries with ``weights_only=True`` (and hands torch's code the
    same values, saved again, to set where they belong).
    """
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value) -> None:
            plain = io.BytesIO()
            torch.save(torch.load(value, weights_only=True), plain)
            plain.seek(0)
            super().load_bytes(read_item, plain)

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):  # FileSystemReader's, with the unpickler swapped
            with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as file:
                metadata = read_dcp_metadata(file)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader, SafePlanner


def load_model_weights(model: nn.Module, path: Path, weights: dict | None) -> None:
    """Load a checkpoint's model weights into ``model``, sharded or not.

    The weights are those of a folder checkpoint (``weights`` None), or the whole ``weights`` of a file. Collective
    where the model is sharded.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    if weights is None:
        state = {"model": get_model_state_dict(model)}
        _load(state, path)
        set_model_state_dict(model, state["model"])
    else:
        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))


@contextlib.contextmanager
def _one_line_failures():
    """DCP's ``CheckpointException`` as a ``ShardsFailed`` naming the first failed rank's error.

    DCP raises every rank's failure on all ranks as a ``CheckpointException``, a BaseException, which
    ``except Exception`` misses.
    """
    try:
        yield
    except BaseException as error:
        failures = getattr(error, "failures", None)
        if not failures or type(error).__name__ != "CheckpointException":
            raise
        rank, cause = next(iter(failures.items()))
        cause = cause[0] if isinstance(cause, tuple) else cause  # (exception, traceback)
        raise ShardsFailed(f"rank {rank}: {described(cause)}") from None
