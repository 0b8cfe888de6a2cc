"""One job at a time in a run directory: a lock file naming its holder, taken by rank 0 for the whole job.

What it relies on, so that it holds on local disks and on the network file systems clusters use (NFSv3+, Lustre,
GPFS, BeeGFS): creating a file with O_CREAT|O_EXCL succeeds for exactly one creator; rename is atomic; a file
opened after another client closed it shows that client's writes and times (NFS close-to-open consistency). It
does not rely on flock or fcntl locks, which some cluster mounts (Lustre without ``-o flock``) do not share
between nodes or do not offer at all.

A holder is judged dead, and its lock taken over, when
- it was an earlier attempt of the same job (the same Slurm job id or torchrun rendezvous id): a torchrun
  restart or a Slurm requeue continues at once;
- it ran on this host and its process is gone (its pid and the process's start time both checked);
- it ran on another host and its heartbeat (the lock file's modification time, touched every ``BEAT_S``) has not
  moved for ``STALE_S``: only then does a start wait, for that long.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from launcher.errors import UserError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
BEAT_S = 10.0
STALE_S = 60.0


@dataclass(frozen=True)
class Holder:
    """Who holds a run directory: enough to tell whether it is alive, and to name it in an error."""

    host: str
    pid: int
    started: str  # the process's start time as the kernel counts it: a reused pid has another
    job: str | None
    token: str
    since: str

    @classmethod
    def this_process(cls, job: str | None) -> "Holder":
        return cls(socket.gethostname(), os.getpid(), _process_start(os.getpid()) or "", job, secrets.token_hex(8),
                   time.strftime("%Y-%m-%d %H:%M:%S"))

    def describe(self) -> str:
        job = f"job {self.job}, " if self.job else ""
        return f"{job}pid {self.pid} on {self.host}, since {self.since}"


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (field 22 of /proc/<pid>/stat), or None if there is no such live process
    (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the command name, in parentheses, may hold spaces
    return None if fields[0] in ("Z", "X") else fields[19]


def _alive_here(holder: Holder) -> bool:
    if not Path("/proc/self/stat").exists():  # no procfs: the pid alone
        try:
            os.kill(holder.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    start = _process_start(holder.pid)
    return start is not None and (not holder.started or start == holder.started)


def check_writable(run_dir: Path) -> None:
    """Fail in one line when ``run_dir`` cannot be a run directory: a file, under a file, or not writable."""
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.is_file() or not existing.is_dir():
        where = "is a file" if existing == run_dir else f"is under {existing}, which is a file"
        raise UserError(f"run.dir={run_dir} {where}: give a directory (or a path where one can be made)")
    try:  # by trying: root passes os.access on a read-only file system
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".launcher-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        what = "is not writable" if existing == run_dir else f"cannot be made: {existing} is not writable"
        raise UserError(f"run.dir={run_dir} {what} ({error.strerror}): pick a run.dir you can write to") from None


class RunLock:
    """The lock on one run directory. ``acquire`` takes it (making the directory if needed), ``release`` gives it
    back; a thread touches it every ``BEAT_S`` meanwhile and notices if it was ever taken away."""

    def __init__(self, run_dir: Path, job: str | None):
        self.run_dir, self.path = run_dir, run_dir / LOCK_NAME
        self.me = Holder.this_process(job)
        self.created: list[Path] = []  # directories this lock made, removed again if the start fails
        self.lost = False
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(self) -> None:
        check_writable(self.run_dir)
        self._make_dirs()
        while True:
            if self._create():
                break
            holder = self._read(self.path)
            if holder is None:  # vanished, or its holder is still writing it
                time.sleep(0.2)
                continue
            reason = self._dead(holder)
            if reason is None:
                raise self._busy(holder)
            if self._break(holder):
                log.info("run.dir %s: took over the lock of %s (%s)", self.run_dir, holder.describe(), reason)
        self._beat = threading.Thread(target=self._heartbeat, name="launcher-run-lock", daemon=True)
        self._beat.start()

    def check_free(self) -> None:
        """Fail now if a live process on this host holds the directory (the parent's check before it starts
        workers; a holder on another host is judged by rank 0, which may have to watch its heartbeat)."""
        check_writable(self.run_dir)
        holder = self._read(self.path) if self.path.exists() else None
        if holder and holder.host == self.me.host and holder.job != self.me.job and _alive_here(holder):
            raise self._busy(holder)

    def release(self, keep_dirs: bool = True) -> None:
        """Give the lock back (if it is still ours); without ``keep_dirs``, also remove the directories
        ``acquire`` made, when they hold nothing else (a start that failed leaves no trace)."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        holder = self._read(self.path)
        if holder is not None and holder.token == self.me.token:
            self.path.unlink(missing_ok=True)
        if not keep_dirs:
            for folder in reversed(self.created):
                try:
                    folder.rmdir()
                except OSError:  # not empty: something else lives there now
                    break

    def _make_dirs(self) -> None:
        missing = [self.run_dir, *self.run_dir.parents]
        missing = [folder for folder in missing if not folder.exists()]
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"run.dir={self.run_dir} cannot be made ({error.strerror})") from None
        self.created = list(reversed(missing))  # outermost first

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as error:
            raise UserError(f"run.dir={self.run_dir}: cannot write its lock file ({error.strerror})") from None
        with os.fdopen(fd, "w") as file:
            json.dump(asdict(self.me), file)
            file.flush()
            os.fsync(file.fileno())
        return True

    @staticmethod
    def _read(path: Path) -> Holder | None:
        try:
            return Holder(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def _dead(self, holder: Holder) -> str | None:
        """Why ``holder`` is gone, or None while it lives."""
        if holder.job is not None and holder.job == self.me.job:
            return "an earlier attempt of this job"
        if holder.host == self.me.host:
            return None if _alive_here(holder) else "its process is gone"
        log.info("run.dir %s is locked by %s, on another host: watching its heartbeat for %.0f s", self.run_dir,
                 holder.describe(), STALE_S)
        before = self._mtime()
        time.sleep(STALE_S)
        after, now = self._mtime(), self._read(self.path)
        if now is not None and now.token == holder.token and after != before:
            return None
        return "its heartbeat stopped"

    def _mtime(self) -> float | None:
        try:
            with open(self.path, "rb") as file:  # opening revalidates cached attributes on NFS
                return os.fstat(file.fileno()).st_mtime
        except OSError:
            return None

    def _break(self, holder: Holder) -> bool:
        """Move a dead holder's lock aside; False if another start got there first."""
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{self.me.token}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        moved = self._read(aside)
        if moved is None or moved.token != holder.token:  # a new holder's lock: put it back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return True

    def _busy(self, holder: Holder) -> UserError:
        return UserError(
            f"run.dir={self.run_dir} is in use by another job ({holder.describe()}): wait for it to end, or give "
            f"this run another run.name or run.dir. If that job is dead, delete {self.path}"
        )

    def _heartbeat(self) -> None:
        while not self._stop.wait(BEAT_S):
            holder = self._read(self.path)
            if holder is None or holder.token != self.me.token:
                if not self.lost:
                    log.error("run.dir %s: the lock was taken over by %s; no more checkpoints are written",
                              self.run_dir, holder.describe() if holder else "someone who then released it")
                self.lost = True
                continue
            try:
                os.utime(self.path)
            except OSError:
                pass
