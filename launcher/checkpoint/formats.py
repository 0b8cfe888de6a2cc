"""The two kinds of checkpoint, each an object that names, verifies, loads, lists, copies and removes its own.

A run writes one kind, the one its strategy names (``FORMATS``, distributed/strategy.py): a single file,
``step_<N>.pt``, in which rank 0 writes every rank's state (ddp), or a folder of shards, ``step_<N>/``, in which
every rank writes its own with torch.distributed.checkpoint and rank 0 adds ``launcher.pt`` (fsdp:
checkpoint/sharded.py). A checkpoint found on disk or named by the user is of the kind its path shows
(``format_of``, the one place that looks).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

import torch

from launcher.checkpoint.files import (
    DCP_METADATA,
    SHARDED_META,
    STEP_PREFIX,
    TRAINING_KEYS,
    BadCheckpoint,
    file_crc32,
    publish_folder,
    read_dcp_metadata,
    shapes,
    verify_records,
)
from launcher.checkpoint.sharded import assembled_weights, load_shards, saved_shapes
from launcher.errors import UserError, described
from launcher.storage import fsync_dir, write_atomic

log = logging.getLogger(__name__)

_STEP_NAME = re.compile(rf"{STEP_PREFIX}\d+(\.pt)?")


class SingleFile:
    """A checkpoint in one file (``step_<N>.pt``, ``best.pt``); also a bare model state_dict such as model.pt."""

    sharded = False

    def path(self, folder: Path, name: str) -> Path:
        return folder / f"{name}.pt"

    def load(self, path: Path, check_shards: bool = True) -> dict:
        """Loaded on the CPU with ``weights_only=True``, memory-mapped, every record's CRC-32 checked."""
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as error:  # truncated, corrupt, or not a torch file at all
            raise BadCheckpoint(described(error)) from None
        if not isinstance(saved, dict):
            raise BadCheckpoint(f"it holds a {type(saved).__name__}, not a dict")
        verify_records(path)
        return saved

    def record(self, path: Path) -> Path:
        """The file that holds the run's id and position."""
        return path

    def files(self, path: Path) -> list[Path]:
        return [path]

    def shapes(self, path: Path, saved: dict) -> dict:
        """The model's parameter and buffer shapes, of ``saved`` (this file, loaded)."""
        return shapes(self.weights(path, saved))

    def weights(self, path: Path, saved: dict) -> dict:
        """The whole model's state_dict, of ``saved`` (a checkpoint, or a bare state_dict, loaded)."""
        return saved["model"] if "global_step" in saved and "model" in saved else saved

    def copy(self, source: Path, target: Path) -> None:
        """``target`` becomes a copy of ``source``, atomically."""
        def copy(file) -> None:
            with source.open("rb") as original:
                shutil.copyfileobj(original, file)

        write_atomic(target, copy)

    def remove(self, path: Path) -> None:
        path.unlink(missing_ok=True)

    def publish(self, written: Path, path: Path) -> None:
        """Rename the complete file ``written`` to ``path``, durably."""
        os.replace(written, path)
        fsync_dir(path.parent)

    def restore(self, model, optimizer, path: Path, saved: dict) -> None:
        """Put ``saved`` (this file, loaded) back into the whole ``model`` and its ``optimizer``."""
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(_copied_state(saved["optimizer"]))


class ShardFolder:
    """A checkpoint in a folder of shards (``step_<N>/``, ``best/``), with ``launcher.pt`` listing every file."""

    sharded = True

    def path(self, folder: Path, name: str) -> Path:
        return folder / name

    def load(self, path: Path, check_shards: bool = True) -> dict:
        """Its ``launcher.pt``, verified, with every shard's size checked and (``check_shards``) its CRC-32."""
        if not (path / SHARDED_META).is_file():
            raise BadCheckpoint(f"it has no {SHARDED_META}: its writer did not finish")
        meta = FILE.load(path / SHARDED_META)
        if not isinstance(meta.get("files"), dict) or DCP_METADATA not in meta["files"]:
            raise BadCheckpoint(f"its {SHARDED_META} lists no {DCP_METADATA}: not a checkpoint this launcher wrote")
        for name, (size, crc) in meta["files"].items():
            shard = path / name
            if not shard.is_file():
                raise BadCheckpoint(f"its file {name} is missing")
            if shard.stat().st_size != size:
                raise BadCheckpoint(f"its file {name} has {shard.stat().st_size} bytes, not the {size} written")
            if check_shards and file_crc32(shard) != crc:
                raise BadCheckpoint(f"its file {name} does not match its checksum")
        with open(path / DCP_METADATA, "rb") as file:  # a checksum proves nothing of a file its writer forged
            read_dcp_metadata(file)
        return meta

    def record(self, path: Path) -> Path:
        return path / SHARDED_META

    def files(self, path: Path) -> list[Path]:
        return sorted(file for file in path.iterdir() if file.is_file())

    def shapes(self, path: Path, saved: dict) -> dict:
        return saved_shapes(path)

    def weights(self, path: Path, saved: dict) -> dict:
        """Assembled from its shards in this one process, on the CPU."""
        return assembled_weights(path)

    def copy(self, source: Path, target: Path) -> None:
        """Hard links (instant: a published folder's files never change), or copies; then renamed into place."""
        copied = target.with_name(f".{target.name}.tmp")
        shutil.copytree(source, copied, copy_function=_link_or_copy)
        publish_folder(copied, target)

    def publish(self, written: Path, path: Path) -> None:
        """Rename the complete folder ``written`` to ``path`` (replacing one there), durably."""
        publish_folder(written, path)

    def restore(self, model, optimizer, path: Path, saved: dict) -> None:
        """Collective: put the shards of ``path`` back into this rank's shards of ``model`` and ``optimizer``."""
        load_shards(model, optimizer, path)

    def remove(self, path: Path) -> None:
        """Delete the folder, renamed to a temporary name first.

        So a crash half-way leaves a leftover the next save clears, never a step folder that is neither whole nor
        removable.
        """
        doomed = path if path.name.endswith(".tmp") else path.with_name(f".{path.name}.gone.tmp")
        if doomed != path:
            os.replace(path, doomed)
        shutil.rmtree(doomed)


FILE, FOLDER = SingleFile(), ShardFolder()
FORMATS = {"file": FILE, "folder": FOLDER}  # by the name a strategy gives its checkpoints'


def _copied_state(optimizer_state: dict) -> dict:
    """The optimizer's state with its tensors copied out of the memory-mapped checkpoint.

    The optimizer keeps them and writes them at the next step: a mapped page is then copied on its first write,
    one 4 KB fault at a time, where one copy of each tensor costs far less (BENCHMARKS.md, "Checkpoint").
    """
    state = {key: {name: value.clone() if isinstance(value, torch.Tensor) else value for name, value in entry.items()}
             for key, entry in optimizer_state["state"].items()}
    return {**optimizer_state, "state": state}


def format_of(path: Path) -> SingleFile | ShardFolder:
    """The kind of the checkpoint at ``path``."""
    return FOLDER if path.is_dir() else FILE


def load_checkpoint(path: Path, check_shards: bool = True) -> dict:
    """A checkpoint or a model state_dict, loaded on the CPU with ``weights_only=True`` and verified.

    Every record's CRC-32 must match its content (torch's own reader does not check them), else ``BadCheckpoint``. Of a
    folder checkpoint, its ``launcher.pt``, with every shard's size checked and (``check_shards``) its CRC-32.

    The file is memory-mapped: the verification reads it once, at the CRC's speed, and the tensors are its pages
    (copy-on-write), which is faster than reading it into fresh memory and then checking it.
    """
    return format_of(path).load(path, check_shards)


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint file or folder (a leftover ``.tmp`` one too)."""
    format_of(path).remove(path)


def step_files(folder: Path) -> list[Path]:
    """Step checkpoints (files, and folders of shards: ``step_<N>``), newest first."""
    found = [path for path in folder.glob(f"{STEP_PREFIX}*")
             if _STEP_NAME.fullmatch(path.name) and (path.suffix == ".pt" or format_of(path).sharded)]
    return sorted(found, key=lambda path: path.name.removesuffix(".pt"), reverse=True)


def step_of(path: Path) -> int:
    return int(path.name.removesuffix(".pt").removeprefix(STEP_PREFIX))


def run_id_of(path: Path) -> str | None:
    """The id of the run that wrote ``path``, read without loading its tensors.

    "" for a checkpoint from before checkpoints carried one; None when it does not load at all.
    """
    try:
        record = format_of(path).record(path)
        return torch.load(record, map_location="cpu", weights_only=True, mmap=True).get("run_id", "")
    except Exception:
        return None


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


def _link_or_copy(source: str, target: str) -> None:
    """A hard link, or a copy where the file system has none (some FUSE and object-store mounts)."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
        with open(target, "rb") as file:  # on disk before the folder is renamed into place, as the step's was
            os.fsync(file.fileno())
