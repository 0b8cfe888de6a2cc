"""Checkpoint files: written atomically, verified when loaded, found again after any crash.

Loading checks every record against its CRC-32. A checkpoint is one file (``step_<N>.pt``), or under
``dist.strategy=fsdp`` a folder (``step_<N>/``) of torch.distributed.checkpoint shards with our own small
``launcher.pt`` beside them (checkpoint/sharded.py).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import pickle
import re
import shutil
import struct
import tempfile
import zipfile
import zlib
from pathlib import Path

import torch

from launcher.errors import LauncherError, UserError

log = logging.getLogger(__name__)

STEP_PREFIX = "step_"
_STEP_NAME = re.compile(rf"{STEP_PREFIX}\d+(\.pt)?")
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
    writer computes it as it writes, at no measurable cost), which ``load_checkpoint`` verifies.
    """
    with _crc32_on_save():
        _write_atomic(path, lambda file: torch.save(state, file))


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


def _write_atomic(path: Path, write) -> None:
    """``write(file)`` into a temporary file beside ``path``, fsync, rename over ``path``, fsync the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_model(state_dict: dict, path: Path) -> None:
    """model.pt: the bare state_dict, atomically; one line if it cannot be written."""
    try:
        save_atomic(state_dict, path)
    except (OSError, RuntimeError) as error:
        free = shutil.disk_usage(path.parent).free / 2**20
        raise LauncherError(f"writing {path} failed ({type(error).__name__}: {_first_line(error)}; {free:.1f} MB free "
                            "on its device); the run's last checkpoint is intact: free space, then run the same "
                            "command to write it") from None


def load_checkpoint(path: Path, check_shards: bool = True) -> dict:
    """A checkpoint or a model state_dict, loaded on the CPU with ``weights_only=True`` and verified.

    Every record's CRC-32 must match its content (torch's own reader does not check them), else ``BadCheckpoint``. Of a
    folder checkpoint, its ``launcher.pt``, with every shard's size checked and (``check_shards``) its CRC-32.

    The file is memory-mapped: the verification reads it once, at the CRC's speed, and the tensors are its pages
    (copy-on-write), which is faster than reading it into fresh memory and then checking it.
    """
    if path.is_dir():
        return _load_sharded_meta(path, check_shards)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # truncated, corrupt, or not a torch file at all
        raise BadCheckpoint(f"{type(error).__name__}: {_first_line(error)}") from None
    if not isinstance(saved, dict):
        raise BadCheckpoint(f"it holds a {type(saved).__name__}, not a dict")
    _verify_records(path)
    return saved


def _load_sharded_meta(folder: Path, check_shards: bool) -> dict:
    if not (folder / SHARDED_META).is_file():
        raise BadCheckpoint(f"it has no {SHARDED_META}: its writer did not finish")
    meta = load_checkpoint(folder / SHARDED_META)
    if not isinstance(meta.get("files"), dict) or DCP_METADATA not in meta["files"]:
        raise BadCheckpoint(f"its {SHARDED_META} lists no {DCP_METADATA}: not a checkpoint this launcher wrote")
    for name, (size, crc) in meta["files"].items():
        shard = folder / name
        if not shard.is_file():
            raise BadCheckpoint(f"its file {name} is missing")
        if shard.stat().st_size != size:
            raise BadCheckpoint(f"its file {name} has {shard.stat().st_size} bytes, not the {size} written")
        if check_shards and file_crc32(shard) != crc:
            raise BadCheckpoint(f"its file {name} does not match its checksum")
    with open(folder / DCP_METADATA, "rb") as file:  # a checksum proves nothing of a file its writer forged
        read_dcp_metadata(file)
    return meta


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
        problem = f"{type(error).__name__}: {_first_line(error)}"
        raise BadCheckpoint(f"its {DCP_METADATA} does not load ({problem})") from None


def file_crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as file:
        while chunk := file.read(16 * 2**20):
            crc = zlib.crc32(chunk, crc)
    return crc


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error) else ""


def _verify_records(path: Path) -> None:
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


def _tensors(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for value in tree.values() for t in _tensors(value)]
    if isinstance(tree, (list, tuple)):
        return [t for value in tree for t in _tensors(value)]
    return []


def step_files(folder: Path) -> list[Path]:
    """Step checkpoints (files, and folders of shards: ``step_<N>``), newest first."""
    found = [path for path in folder.glob(f"{STEP_PREFIX}*")
             if _STEP_NAME.fullmatch(path.name) and (path.suffix == ".pt" or path.is_dir())]
    return sorted(found, key=lambda path: path.name.removesuffix(".pt"), reverse=True)


def step_of(path: Path) -> int:
    return int(path.name.removesuffix(".pt").removeprefix(STEP_PREFIX))


def run_id_of(path: Path) -> str | None:
    """The id of the run that wrote ``path``, read without loading its tensors.

    "" for a checkpoint from before checkpoints carried one; None when it does not load at all.
    """
    try:
        record = path / SHARDED_META if path.is_dir() else path
        return torch.load(record, map_location="cpu", weights_only=True, mmap=True).get("run_id", "")
    except Exception:
        return None


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint file, or folder, renaming it to a temporary name first.

    So a crash half-way through leaves a leftover the next save clears, never a step folder that is neither whole nor
    removable.
    """
    if not path.is_dir():
        path.unlink(missing_ok=True)
        return
    doomed = path if path.name.endswith(".tmp") else path.with_name(f".{path.name}.gone.tmp")
    if doomed != path:
        os.replace(path, doomed)
    shutil.rmtree(doomed)


def publish_folder(written: Path, path: Path) -> None:
    """Rename the complete folder ``written`` to ``path`` (replacing one there), durably.

    The one there is renamed aside first (a folder cannot be renamed over another); a crash between the two renames
    leaves it aside, where ``restore_set_aside`` finds it.
    """
    _fsync_dir(written)
    aside = path.with_name(f".{path.name}.old.tmp")
    if path.exists():
        os.replace(path, aside)
    os.replace(written, path)
    _fsync_dir(path.parent)
    remove_checkpoint(aside)


def restore_set_aside(folder: Path) -> None:
    """Put back a folder ``publish_folder`` had set aside when a crash kept its replacement from taking its place."""
    for aside in folder.glob(".*.old.tmp"):
        original = folder / aside.name.removeprefix(".").removesuffix(".old.tmp")
        if not original.exists():
            os.replace(aside, original)


def newest_good(folder: Path, run_id: str | None) -> tuple[Path, dict] | None:
    """The newest step checkpoint of run ``run_id`` (None: of any run) that loads and verifies.

    The others are skipped with a one-line warning each.
    """
    for path in step_files(folder):
        try:
            saved = load_checkpoint(path)
        except BadCheckpoint as error:
            log.warning("checkpoint %s is unreadable (%s); trying the one before", path, error)
            continue
        missing = missing_parts(saved)
        if missing:
            log.warning("checkpoint %s is not a training checkpoint (it lacks %s); trying the one before", path,
                        ", ".join(missing))
            continue
        if run_id is not None and saved.get("run_id", run_id) != run_id:
            log.warning("checkpoint %s belongs to another run (%s), not this directory's (%s); skipped", path,
                        saved["run_id"], run_id)
            continue
        return path, saved
    return None


def shapes(state_dict: dict) -> dict:
    return {name: tuple(tensor.shape) for name, tensor in state_dict.items()}


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


def missing_parts(saved: dict) -> list[str]:
    """What a loaded file lacks of a training checkpoint (none: it is one)."""
    weights = [] if "model" in saved or "files" in saved else ["model"]
    return weights + [key for key in TRAINING_KEYS if key not in saved]


def is_checkpoint(saved: dict) -> bool:
    """A training checkpoint, as opposed to a bare model state_dict such as model.pt.

    ``saved`` is loaded from a checkpoint file, or from a folder's launcher.pt.
    """
    return "global_step" in saved and ("model" in saved or "files" in saved)


def load_named(path: Path, key: str = "ckpt.resume", check_shards: bool = True) -> dict:
    """A checkpoint the user named: loaded and verified, or one line saying why not."""
    try:
        return load_checkpoint(path, check_shards)
    except BadCheckpoint as error:
        raise UserError(f"{key}={path} does not load ({error})") from None
