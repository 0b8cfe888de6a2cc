"""A run's copy in object storage (``ckpt.remote``): any fsspec URL, every object verified after it is written.

The prefix holds what the run directory holds: ``checkpoints/`` (each checkpoint's files under their local names),
``model.pt`` and the ledger files. A checkpoint counts only once its manifest is there,
``checkpoints/<name>.manifest.json`` (every file's size and CRC-32), written after its files were uploaded and read
back: an upload cut short leaves none, and a file that no longer matches its manifest is corrupt. The storage library
(s3fs, gcsfs, adlfs: optional extras) finds the credentials in its own environment variables and files; a URL carries
none.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Callable

from launcher.checkpoint.files import BadCheckpoint, _first_line, file_size_and_crc32, read_size_and_crc32
from launcher.checkpoint.formats import FILE, FOLDER, format_of, remove_checkpoint
from launcher.errors import UserError

log = logging.getLogger(__name__)

MANIFEST_SUFFIX = ".manifest.json"
_CHUNK = 16 * 2**20
_FILE_NAME = re.compile(r"[\w.-]+")  # what a checkpoint's file may be called: no separators, no ".."
_EXTRAS = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}


class StoreHoldsAnotherRun(Exception):
    """The store already holds, under a checkpoint's name, another run's."""


class RemoteStore:
    """One run's prefix in object storage: objects written and read whole, and verified."""

    def __init__(self, url: str):
        import fsspec

        self.url = url.rstrip("/")
        protocol = fsspec.core.split_protocol(self.url)[0] or "file"
        try:
            options = {"auto_mkdir": True} if protocol in ("file", "local") else {}
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **options)
        except Exception as error:  # no such protocol, its library missing, or a store that refuses at once
            library = _EXTRAS.get(protocol, "its fsspec implementation")
            hint = f": install {library} (pip install {library})" if isinstance(error, ImportError) else ""
            raise UserError(f"ckpt.remote={self.url} cannot be used here ({type(error).__name__}: "
                            f"{_first_line(error) or protocol}){hint}",
                            same_on_all_ranks=True) from None

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def read(self, name: str) -> bytes | None:
        """An object's bytes; None if there is none."""
        try:
            return self.fs.cat_file(self._path(name))
        except FileNotFoundError:
            return None

    def write(self, name: str, data: bytes) -> None:
        """Write an object and read it back: it is there, whole, or this raises."""
        self.fs.pipe_file(self._path(name), data)
        if self.read(name) != data:
            raise OSError(f"{name}: the stored copy does not match what was written")

    def remove(self, name: str) -> None:
        try:
            self.fs.rm_file(self._path(name))
        except FileNotFoundError:
            pass

    def modified(self, name: str) -> float | None:
        """When the store last wrote ``name`` (its own clock, seconds since the epoch); None if there is none."""
        try:
            return self.fs.modified(self._path(name)).timestamp()
        except FileNotFoundError:
            return None

    def upload(self, local: Path, name: str, expected: list[int]) -> None:
        """Upload the file ``local`` as ``name`` and read it back: ``expected`` (size, CRC-32) must match."""
        self.fs.put_file(str(local), self._path(name))
        with self.fs.open(self._path(name), "rb", block_size=_CHUNK) as stored:
            found = read_size_and_crc32(stored)
        if found != expected:
            raise OSError(f"{name}: the uploaded copy has size and CRC-32 {found}, not the {expected} of {local}")

    def manifest(self, name: str, under: str = "checkpoints") -> dict | None:
        """The manifest of checkpoint ``name``; None if it has none, or one that does not parse."""
        raw = self.read(_joined(under, f"{name}{MANIFEST_SUFFIX}"))
        try:
            manifest = json.loads(raw) if raw is not None else None
            return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else None
        except ValueError:
            return None

    def checkpoint_names(self) -> list[str]:
        """The names of the step checkpoints with a manifest, newest first."""
        self.fs.invalidate_cache()  # a listing cached earlier would miss what another process wrote
        found = self.fs.glob(self._path(f"checkpoints/step_*{MANIFEST_SUFFIX}"))
        names = [path.rsplit("/", 1)[-1].removesuffix(MANIFEST_SUFFIX) for path in found]
        return sorted(names, key=lambda name: name.removesuffix(".pt"), reverse=True)

    def upload_checkpoint(self, path: Path, run_id: str, before_manifest: Callable[[], None] = lambda: None,
                          under: str = "checkpoints") -> bool:
        """Upload the checkpoint ``path``, then its manifest; False if it is there already.

        ``path`` is a file or a folder of shards (or model.pt, ``under`` the root). A manifest that differs (an
        earlier upload of another ``best``) is deleted first: while its files are being replaced, the checkpoint is
        not there. One of another run is never replaced (``StoreHoldsAnotherRun``).
        ``before_manifest`` runs before the manifest is written (and may raise to keep it unwritten).
        """
        table = {local.relative_to(path.parent).as_posix(): file_size_and_crc32(local)
                 for local in format_of(path).files(path)}
        manifest, manifest_name = {"run_id": run_id, "files": table}, _joined(under, f"{path.name}{MANIFEST_SUFFIX}")
        existing = self.manifest(path.name, under)
        if existing == manifest:
            return False
        if existing is not None and existing.get("run_id") != run_id:
            raise StoreHoldsAnotherRun(f"ckpt.remote={self.url} holds {manifest_name} of run {existing.get('run_id')},"
                                       f" not this run ({run_id})")
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
        manifest = self.manifest(name)
        if manifest is None:
            raise BadCheckpoint("its manifest is missing or does not parse")
        files = manifest["files"]
        if not files or not all(_is_part_of(name, relative) for relative in files):
            raise BadCheckpoint("its manifest names files outside it")
        path, written = folder / name, folder / f".{name}.remote.tmp"
        kind = FILE if name in files else FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        remove_checkpoint(written)
        if kind.sharded:
            written.mkdir()
        try:
            for relative, expected in files.items():
                local = written if relative == name else written / relative.split("/", 1)[1]
                try:
                    self.fs.get_file(self._path(f"checkpoints/{relative}"), str(local))
                except FileNotFoundError:
                    raise BadCheckpoint(f"its file {relative} is missing from the store") from None
                found = file_size_and_crc32(local)
                if found != list(expected):
                    raise BadCheckpoint(f"its file {relative} has size and CRC-32 {found}, not the {expected} of "
                                        "its manifest")
        except BaseException:
            remove_checkpoint(written)
            raise
        kind.publish(written, path)
        return path


def _joined(under: str, name: str) -> str:
    return f"{under}/{name}" if under else name


def _is_part_of(name: str, relative: str) -> bool:
    """Whether a manifest's ``relative`` path is checkpoint ``name``'s own file (the file, or one in its folder)."""
    parts = relative.split("/")
    return relative == name or (len(parts) == 2 and parts[0] == name and bool(_FILE_NAME.fullmatch(parts[1]))
                                and parts[1] not in (".", ".."))
