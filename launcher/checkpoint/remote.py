"""A run's copy in object storage (``ckpt.remote``): any fsspec URL, every object verified after it is written.

The prefix holds what the run directory holds: ``checkpoints/`` (each checkpoint's files under their local names),
``model.pt`` and the ledger files. A checkpoint counts only once its manifest is there,
``checkpoints/<name>.manifest.json`` (its run's identity, every file's size and CRC-32), written after its files were
uploaded and read back: an upload cut short leaves none, and a file that no longer matches its manifest is corrupt.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

from launcher.checkpoint.files import BadCheckpoint
from launcher.checkpoint.formats import FILE, FOLDER, format_of, remove_checkpoint
from launcher.errors import UserError
from launcher.storage import FsspecStore, file_size_and_crc32, read_size_and_crc32

MANIFEST_SUFFIX = ".manifest.json"
_CHUNK = 16 * 2**20
_FILE_NAME = re.compile(r"[\w.-]+")  # what a checkpoint's file may be called: no separators, no ".."


class StoreHoldsAnotherRun(UserError):
    """The store already holds, under a checkpoint's name, another run's."""


class RemoteStore(FsspecStore):
    """One run's prefix in object storage: checkpoints uploaded and downloaded whole, every file verified."""

    def upload(self, local: Path, name: str, expected: list[int]) -> None:
        """Upload the file ``local`` as ``name`` and read it back: ``expected`` (size, CRC-32) must match."""
        self.fs.put_file(str(local), self.path(name))
        with self.fs.open(self.path(name), "rb", block_size=_CHUNK) as stored:
            found = read_size_and_crc32(stored)
        if found != expected:
            raise OSError(f"{name}: the uploaded copy has size and CRC-32 {found}, not the {expected} of {local}")

    def manifest(self, name: str, under: str = "checkpoints") -> dict | None:
        """Checkpoint ``name``'s manifest (``run_id``, ``config``, ``files``); None if none parses.

        ``files`` maps each of its files to its size and CRC-32.
        """
        raw = self.read(_joined(under, f"{name}{MANIFEST_SUFFIX}"))
        try:
            manifest = json.loads(raw) if raw is not None else None
        except ValueError:
            return None
        return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else None

    def checkpoint_names(self) -> list[str]:
        """The names of the step checkpoints with a manifest, newest first."""
        self.fs.invalidate_cache()  # a listing cached earlier would miss what another process wrote
        found = self.fs.glob(self.path(f"checkpoints/step_*{MANIFEST_SUFFIX}"))
        names = [path.rsplit("/", 1)[-1].removesuffix(MANIFEST_SUFFIX) for path in found]
        return sorted(names, key=lambda name: name.removesuffix(".pt"), reverse=True)

    def upload_checkpoint(self, path: Path, identity: dict, before_manifest: Callable[[], None] = lambda: None,
                          under: str = "checkpoints") -> bool:
        """Upload the checkpoint ``path``, then its manifest; False if it is there already.

        ``path`` is a file or a folder of shards (or model.pt, ``under`` the root); ``identity`` is its run's
        (``run_id``, ``config``: what a start tells its run by, should run.json be missing). A manifest that differs
        (an earlier upload of another ``best``) is deleted first: while its files are being replaced, the checkpoint
        is not there. One of another run is never replaced (``StoreHoldsAnotherRun``). ``before_manifest`` runs
        before the manifest is written (and may raise to keep it unwritten).
        """
        table = {local.relative_to(path.parent).as_posix(): file_size_and_crc32(local)
                 for local in format_of(path).files(path)}
        manifest, manifest_name = {**identity, "files": table}, _joined(under, f"{path.name}{MANIFEST_SUFFIX}")
        existing = self.manifest(path.name, under)
        if existing == manifest:
            return False
        if existing is not None and existing.get("run_id") != identity["run_id"]:
            raise StoreHoldsAnotherRun(f"ckpt.remote={self.url} holds {manifest_name} of run {existing.get('run_id')},"
                                       f" not this run ({identity['run_id']})")
        if existing is not None:
            self.remove(manifest_name)
        for relative, expected in table.items():
            self.upload(path.parent / relative, _joined(under, relative), expected)
        before_manifest()
        self.write(manifest_name, json.dumps(manifest).encode())
        return True

    def remove_checkpoint(self, name: str, manifest: dict | None = None) -> None:
        """Delete a checkpoint (whose ``manifest`` may be read already): its manifest first, then its files."""
        manifest = manifest or self.manifest(name)
        self.remove(f"checkpoints/{name}{MANIFEST_SUFFIX}")
        for relative in (manifest or {}).get("files", {}):
            if _is_part_of(name, relative):
                self.remove(f"checkpoints/{relative}")

    def download_checkpoint(self, name: str, folder: Path) -> Path:
        """Download checkpoint ``name`` into ``folder`` and verify every file; raises ``BadCheckpoint``.

        It is written beside its place and renamed into it once every file matches its manifest.
        """
        kind = FILE if name.endswith(".pt") else FOLDER
        files = _listed_files(name, kind, self.manifest(name))
        path, written = folder / name, folder / f".{name}.remote.tmp"
        folder.mkdir(parents=True, exist_ok=True)
        remove_checkpoint(written)
        if kind.sharded:
            written.mkdir()
        try:
            for relative, expected in files.items():
                local = written if relative == name else written / relative.split("/", 1)[1]
                try:
                    self.fs.get_file(self.path(f"checkpoints/{relative}"), str(local))
                except FileNotFoundError:
                    raise BadCheckpoint(f"its file {relative} is missing from the store") from None
                found = file_size_and_crc32(local)
                if found != expected:
                    raise BadCheckpoint(f"its file {relative} has size and CRC-32 {found}, not the {expected} of "
                                        "its manifest")
        except BaseException:
            remove_checkpoint(written)
            raise
        kind.publish(written, path)
        return path


def _joined(under: str, name: str) -> str:
    return f"{under}/{name}" if under else name


def _listed_files(name: str, kind, manifest: dict | None) -> dict[str, list[int]]:
    """The files of ``name`` its manifest lists, with sizes and CRC-32s; else (anything else listed) BadCheckpoint."""
    if manifest is None:
        raise BadCheckpoint("its manifest is missing or does not parse")
    files = manifest["files"]
    if not files or (set(files) != {name} if kind is FILE else name in files) or not all(
            _is_part_of(name, relative) for relative in files):
        raise BadCheckpoint("its manifest names files outside it")
    for relative, expected in files.items():
        if not (isinstance(expected, list) and len(expected) == 2
                and all(type(n) is int and n >= 0 for n in expected)):
            raise BadCheckpoint(f"its manifest gives {relative} {json.dumps(expected)}, not a size and a CRC-32")
    return files


def _is_part_of(name: str, relative: str) -> bool:
    """Whether a manifest's ``relative`` path is checkpoint ``name``'s own file (the file, or one in its folder)."""
    parts = relative.split("/")
    return relative == name or (len(parts) == 2 and parts[0] == name and bool(_FILE_NAME.fullmatch(parts[1]))
                                and parts[1] not in (".", ".."))
