"""Checkpoint files: written atomically, checked record by record, renamed into place durably.

What both kinds of checkpoint (checkpoint/formats.py) are made of: files written by ``save_atomic`` with every record's
CRC-32, folders published by rename, and a folder's DCP metadata read with nothing but its own types allowed.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import pickle
import shutil
import struct
import zipfile
import zlib
from pathlib import Path

import torch

from launcher.errors import LauncherError, UserError, described
from launcher.storage import file_size_and_crc32, fsync_dir, write_atomic

STEP_PREFIX = "step_"
SHARDED_META = "launcher.pt"  # in a folder checkpoint: everything but the shards, and every file's size and CRC-32
DCP_METADATA = ".metadata"  # in a folder checkpoint: torch.distributed.checkpoint's index of the shards, a pickle
# What a training checkpoint holds besides its weights (a file's "model", a folder's "files").
TRAINING_KEYS = ("global_step", "epoch", "samples_in_epoch", "scheduler", "rank_states", "world_size", "config")
# The globals a DCP .metadata names, besides the classes of DCP's metadata module and torch's dtypes.
_DCP_TYPES = "torch.distributed.checkpoint.metadata"
_METADATA_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                     ("pathlib", "PurePosixPath"), ("collections", "OrderedDict"),
                     ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
                     ("torch.distributed.checkpoint.filesystem", "_StoragePrefix")}


class BadCheckpoint(Exception):
    """A checkpoint file that does not load, or whose content does not match its checksums."""


def save_atomic(state: dict, path: Path) -> None:
    """``torch.save`` to a temporary file in the same directory, fsync, then rename over ``path``.

    A reader sees the old file or the new one, never a partial one; a writer killed half-way leaves only a
    ``.tmp`` file behind, which the next save removes. Every record of the file carries its CRC-32 (torch's zip
    writer computes it as it writes, at no measurable cost), which loading verifies (checkpoint/formats.py).
    """
    with _crc32_on_save():
        write_atomic(path, lambda file: torch.save(state, file))


@contextlib.contextmanager
def _crc32_on_save():
    """torch computes the records' CRC-32 unless its serialization config says not to: make sure it does."""
    config = getattr(getattr(torch.utils, "serialization", None), "config", None)
    save_config = getattr(config, "save", None)
    if save_config is None or not hasattr(save_config, "compute_crc32"):  # an older torch: always computed
        yield
        return
    before, save_config.compute_crc32 = save_config.compute_crc32, True
    try:
        yield
    finally:
        save_config.compute_crc32 = before


def save_model(state_dict: dict, path: Path) -> None:
    """model.pt: the bare state_dict, atomically; one line if it cannot be written."""
    try:
        save_atomic(state_dict, path)
    except (OSError, RuntimeError) as error:
        free = shutil.disk_usage(path.parent).free / 2**20
        raise LauncherError(f"writing {path} failed ({described(error)}; {free:.1f} MB free "
                            "on its device); the run's last checkpoint is intact: free space, then run the same "
                            "command to write it") from None


class _MetadataOnly(pickle.Unpickler):
    """Unpickles DCP's metadata and nothing else: a global that is not one of its types is refused, unrun."""

    def find_class(self, module: str, name: str):
        listed = (module, name) in _METADATA_GLOBALS
        if listed or module in ("torch", _DCP_TYPES):
            found = super().find_class(module, name)
            if listed or isinstance(found, torch.dtype) or (isinstance(found, type) and found.__module__ == _DCP_TYPES):
                return found
        raise pickle.UnpicklingError(f"it names {module}.{name}, which no checkpoint's metadata holds")


def read_dcp_metadata(file):
    """A folder checkpoint's DCP metadata, unpickled from ``file`` with nothing but its own types allowed.

    DCP unpickles it with no limit at all: a forged one would run any code it names. Raises ``BadCheckpoint``.
    """
    try:
        return _MetadataOnly(file).load()
    except Exception as error:
        raise BadCheckpoint(f"its {DCP_METADATA} does not load ({described(error)})") from None


def file_crc32(path: Path) -> int:
    return file_size_and_crc32(path)[1]


def verify_records(path: Path) -> None:
    """Check each zip record's CRC-32 against its bytes (stored, uncompressed, as torch writes them).

    A record with no CRC (0: written with torch's compute_crc32 off) cannot be checked and is let through.
    """
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        view = memoryview(mapped)
        try:
            try:
                records = zipfile.ZipFile(file).infolist()
            except zipfile.BadZipFile as error:
                raise BadCheckpoint(f"BadZipFile: {error}") from None
            for record in records:
                if record.CRC == 0 and record.file_size:
                    continue
                if record.compress_type != zipfile.ZIP_STORED:
                    raise BadCheckpoint(f"record {record.filename} is compressed, which torch.save never does")
                start = record.header_offset + 30 + sum(struct.unpack("<HH", view[record.header_offset + 26:
                                                                                  record.header_offset + 30]))
                crc, chunk = 0, 64 * 2**20
                for offset in range(start, start + record.file_size, chunk):
                    crc = zlib.crc32(view[offset:min(offset + chunk, start + record.file_size)], crc)
                if crc != record.CRC:
                    raise BadCheckpoint(f"record {record.filename} does not match its checksum")
        finally:
            view.release()


def tensors(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for value in tree.values() for t in tensors(value)]
    if isinstance(tree, (list, tuple)):
        return [t for value in tree for t in tensors(value)]
    return []


def publish_folder(written: Path, path: Path) -> None:
    """Rename the complete folder ``written`` to ``path`` (replacing one there), durably.

    The one there is renamed aside first (a folder cannot be renamed over another); a crash between the two renames
    leaves it aside, where ``restore_set_aside`` finds it.
    """
    fsync_dir(written)
    aside = path.with_name(f".{path.name}.old.tmp")
    if path.exists():
        os.replace(path, aside)
    os.replace(written, path)
    fsync_dir(path.parent)
    if aside.exists():
        shutil.rmtree(aside)


def restore_set_aside(folder: Path) -> None:
    """Put back a folder ``publish_folder`` had set aside when a crash kept its replacement from taking its place."""
    for aside in folder.glob(".*.old.tmp"):
        original = folder / aside.name.removeprefix(".").removesuffix(".old.tmp")
        if not original.exists():
            os.replace(aside, original)


def shapes(state_dict: dict) -> dict:
    """Name -> shape of each tensor (a module's extra state, ``get_extra_state``, may be anything: it has none)."""
    return {name: tuple(value.shape) for name, value in state_dict.items() if isinstance(value, torch.Tensor)}


def check_model_fits(model: torch.nn.Module, saved: dict, path: Path) -> None:
    """Fail with the first parameter whose name or shape differs between ``saved`` (name -> shape) and ``model``."""
    current = shapes(model.state_dict())
    hint = "the model changed since it was saved: start a new run (run.name=<new name> or a new run.dir)"
    for name, shape in current.items():
        if name not in saved:
            raise UserError(f"checkpoint {path} does not fit the model: it has no '{name}'; {hint}")
        if tuple(saved[name]) != shape:
            raise UserError(
                f"checkpoint {path} does not fit the model: '{name}' is {list(saved[name])} there but "
                f"{list(shape)} in the model this config builds; {hint}"
            )
    extra = [name for name in saved if name not in current]
    if extra:
        raise UserError(f"checkpoint {path} does not fit the model: the model has no '{extra[0]}'; {hint}")
