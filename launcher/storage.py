"""Where a run's files live, and how they are written: atomically on a local disk, verified in object storage.

A store holds named files (a run directory's, or a ``ckpt.remote`` prefix's) behind one small interface, which the
leases of run/lock.py and the uploads of checkpoint/remote.py use alike: ``read``, ``replace`` (write where the file
holds what was read: the one compare-and-swap a lease needs), ``touch``, ``modified``, ``remove``, ``location``. A new
kind of store is one class.
"""

from __future__ import annotations

import os
import secrets
import tempfile
import zlib
from pathlib import Path

from launcher.errors import UserError, first_line

_EXTRAS = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}


def write_atomic(path: Path, write) -> None:
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
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_size_and_crc32(file) -> list[int]:
    """The size and CRC-32 of what ``file``, open for binary reading (a local file, or a store's object), holds."""
    size, crc = 0, 0
    while chunk := file.read(16 * 2**20):
        size, crc = size + len(chunk), zlib.crc32(chunk, crc)
    return [size, crc]


def file_size_and_crc32(path: Path) -> list[int]:
    with open(path, "rb") as file:
        return read_size_and_crc32(file)


class LocalFolder:
    """A folder on a local disk or a cluster's network file system (a run directory) as a store.

    It relies on what NFSv3+, Lustre, GPFS and BeeGFS guarantee: O_CREAT|O_EXCL succeeds for one creator; rename is
    atomic; a file opened after another client closed it shows that client's writes and times (close-to-open
    consistency). Never flock or fcntl locks, which some cluster mounts do not share between nodes or do not offer.
    """

    def __init__(self, folder: Path):
        self.folder = folder

    def location(self, name: str) -> str:
        return str(self.folder / name)

    def read(self, name: str) -> bytes | None:
        try:
            return (self.folder / name).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as error:
            raise UserError(f"run.dir={self.folder}: cannot read {self.folder / name} ({error.strerror})") from None

    def replace(self, name: str, raw: bytes | None, data: bytes) -> bool:
        """Write ``data`` as ``name`` where it holds ``raw`` (None: where there is none); False if it holds more.

        A file that holds ``raw`` is moved aside first: of two starts taking it over, one finds it gone.
        """
        path = self.folder / name
        if raw is not None:
            aside = path.with_name(f"{name}.stale-{secrets.token_hex(8)}")
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                return False
            if self.read(aside.name) != raw:  # another's, written meanwhile: put it back
                try:
                    os.link(aside, path)
                except FileExistsError:
                    pass
            aside.unlink(missing_ok=True)
            if path.exists():
                return False
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as error:
            raise UserError(f"run.dir={self.folder}: cannot write {path} ({error.strerror})") from None
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        return True

    def touch(self, name: str, data: bytes) -> None:
        os.utime(self.folder / name)

    def modified(self, name: str) -> float | None:
        try:
            with open(self.folder / name, "rb") as file:  # opening revalidates cached attributes on NFS
                return os.fstat(file.fileno()).st_mtime
        except OSError:
            return None

    def remove(self, name: str) -> None:
        (self.folder / name).unlink(missing_ok=True)


class FsspecStore:
    """A prefix in object storage, any fsspec URL (s3://, gs://, az://, file://): objects written whole, read back.

    The storage library (s3fs, gcsfs, adlfs: optional extras) finds the credentials in its own environment variables
    and files; a URL carries none. No object store offers an exclusive create: ``replace`` reads back what it wrote,
    and a lease is checked again before every write that publishes.
    """

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
                            f"{first_line(error) or protocol}){hint}", same_on_all_ranks=True) from None

    def location(self, name: str) -> str:
        return f"{self.url}/{name}"

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def read(self, name: str) -> bytes | None:
        try:
            return self.fs.cat_file(self.path(name))
        except FileNotFoundError:
            return None

    def write(self, name: str, data: bytes) -> None:
        """Write an object and read it back: it is there, whole, or this raises."""
        self.fs.pipe_file(self.path(name), data)
        if self.read(name) != data:
            raise OSError(f"{name}: the stored copy does not match what was written")

    def replace(self, name: str, raw: bytes | None, data: bytes) -> bool:
        """Write ``data`` as ``name`` where it holds ``raw`` (None: none); True if it holds ``data`` after."""
        if self.read(name) != raw:
            return False
        self.fs.pipe_file(self.path(name), data)
        return self.read(name) == data

    def touch(self, name: str, data: bytes) -> None:
        self.fs.pipe_file(self.path(name), data)

    def modified(self, name: str) -> float | None:
        """When the store last wrote ``name`` (its own clock, seconds since the epoch); None if there is none."""
        try:
            return self.fs.modified(self.path(name)).timestamp()
        except FileNotFoundError:
            return None

    def remove(self, name: str) -> None:
        try:
            self.fs.rm_file(self.path(name))
        except FileNotFoundError:
            pass
