"""One job at a time in a run directory: a lock file naming its holder, taken by rank 0 for the whole job.

What it relies on, so that it holds on local disks and on the network file systems clusters use (NFSv3+, Lustre,
GPFS, BeeGFS): creating a file with O_CREAT|O_EXCL succeeds for exactly one creator; rename is atomic; a file
opened after another client closed it shows that client's writes and times (NFS close-to-open consistency). It
does not rely on flock or fcntl locks, which some cluster mounts (Lustre without ``-o flock``) do not share
between nodes or do not offer at all.

A holder is a process (host, PID namespace, pid and the process's start time), not a job: two starts in one Slurm
allocation share a job id, and the second must not take the first's directory. A holder is judged gone, and its lock
taken over, when
- it ran on this host, in this PID namespace, and its process is gone (a live one refuses the start, whatever its
  job); a holder in another container of this host, which may share its name but not its pids, counts as another
  host's;
- it was an earlier attempt of the same job (a lower Slurm requeue or torchrun restart count): the scheduler ends
  every process of an attempt before it starts the next, so a requeued or restarted job continues at once on any
  host;
- it ran on another host and its heartbeat (the lock file's modification time, touched every ``BEAT_S``) has not
  moved for ``STALE_S``: only then does a start wait, for that long.
A lock file that names no holder (empty or truncated: its writer was killed between creating and writing it, or the
disk was full; or another program's) is given ``WRITE_GRACE_S`` to be written, then refused in one line while it
is fresher than ``STALE_S``, and taken over once older: every holder of this design writes its lock within
moments of creating it and touches it every ``BEAT_S``. Every wait polls ``check_stop``, so a stop signal ends it.
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
from typing import Callable

from launcher.errors import UserError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
BEAT_S = 10.0
STALE_S = 60.0
WRITE_GRACE_S = 2.0
POLL_S = 0.2
READ_TRIES = 3  # reads of its own lock, a second apart, before a holder concludes it lost it
SHARED_WAIT_S = 10.0  # how long a rank looks for rank 0's lock (a network file system may show it late)


@dataclass(frozen=True)
class Holder:
    """Who holds a run directory: enough to tell whether it is alive, and to name it in an error."""

    host: str
    pid: int
    started: str  # the process's start time as the kernel counts it: a reused pid has another
    job: str | None
    attempt: tuple[int, int]  # of the job, when it took the lock (DistEnv.attempt)
    token: str
    since: str
    pid_namespace: str = ""  # whose pids ``pid`` counts in: containers on one host may share its name, not its pids

    @classmethod
    def this_process(cls, job: str | None, attempt: tuple[int, int] = (0, 0)) -> "Holder":
        return cls(socket.gethostname(), os.getpid(), _process_start(os.getpid()) or "", job, tuple(attempt),
                   secrets.token_hex(8), time.strftime("%Y-%m-%d %H:%M:%S"), _pid_namespace())

    def seen_from(self, other: "Holder") -> bool:
        """Whether ``other`` can tell by the pid alone if this holder lives.

        It can on the same host, in the same PID namespace (an earlier version's lock names none: its host's own).
        """
        return self.host == other.host and (not self.pid_namespace or self.pid_namespace == other.pid_namespace)

    @classmethod
    def parse(cls, raw: bytes | None) -> "Holder | None":
        """The holder a lock file's bytes name, or None.

        None for none: missing, empty, truncated, another format. A lock of an earlier version, without ``attempt``,
        still names its holder.
        """
        try:
            fields = json.loads(raw)
            return cls(str(fields["host"]), int(fields["pid"]), str(fields["started"]), fields["job"],
                       tuple(int(n) for n in fields.get("attempt", (0, 0))), str(fields["token"]), str(fields["since"]),
                       str(fields.get("pid_namespace", "")))
        except (ValueError, TypeError, KeyError):  # JSONDecodeError is a ValueError
            return None

    def describe(self) -> str:
        job = f"job {self.job}, " if self.job else ""
        return f"{job}pid {self.pid} on {self.host}, since {self.since}"


def _read(path: Path) -> bytes | None:
    """A lock file's bytes; None if there is none."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise UserError(f"run.dir={path.parent}: cannot read its lock file {path} ({error.strerror})") from None


def _pid_namespace() -> str:
    """This process's PID namespace ("pid:[4026531836]"), or "" where there is no procfs to say."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (field 22 of /proc/<pid>/stat).

    None if there is no such live process (a zombie counts as gone).
    """
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


def check_shared(run_dir: Path, token: str) -> None:
    """Fail in one line unless this process sees the lock rank 0 took (``token``) in ``run_dir``.

    A directory on a disk of one node alone (the same path on a node-local disk elsewhere) cannot hold the job's
    checkpoints, which every rank writes or reads.
    """
    path, deadline = run_dir / LOCK_NAME, time.monotonic() + SHARED_WAIT_S
    while True:
        try:
            os.listdir(run_dir)  # opening the folder revalidates what a network file system cached of it
            holder = Holder.parse(path.read_bytes())
        except OSError:
            holder = None
        if holder is not None and holder.token == token:
            return
        if time.monotonic() > deadline:
            raise UserError(
                f"run.dir={run_dir} is not the directory rank 0 locked ({socket.gethostname()} does not see its "
                f"lock): the run directory must be on a file system every node shares, not on a node-local disk"
            )
        time.sleep(POLL_S)


def _no_stop(doing: str) -> None:
    pass


class RunLock:
    """The lock on one run directory.

    ``acquire`` takes it (making the directory if needed), ``release`` gives it back; a thread touches it every
    ``BEAT_S`` meanwhile and notices if it is taken away.
    """

    def __init__(self, run_dir: Path, job: str | None, attempt: tuple[int, int] = (0, 0)):
        self.run_dir, self.path = run_dir, run_dir / LOCK_NAME
        self.me = Holder.this_process(job, attempt)
        self.created: list[Path] = []  # directories this lock made, removed again if the start fails
        self.lost = False
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(self, check_stop: Callable[[str], None] = _no_stop) -> str:
        """Take the lock, or fail in one line; returns its token.

        Every wait calls ``check_stop(what it waits for)``, which raises to end it (a stop signal).
        """
        check_writable(self.run_dir)
        self._make_dirs()
        while not self._create():
            raw = _read(self.path)
            if raw is None:  # released meanwhile: try again
                continue
            holder = Holder.parse(raw)
            reason = self._dead(holder, check_stop) if holder else self._abandoned(raw, check_stop)
            if reason is None:  # it changed while we looked: judge it again
                continue
            if self._break(raw):
                log.info("run.dir %s: took over the lock of %s (%s)", self.run_dir,
                         holder.describe() if holder else "no one", reason)
        self._beat = threading.Thread(target=self._heartbeat, name="launcher-run-lock", daemon=True)
        self._beat.start()
        return self.me.token

    def check_free(self) -> None:
        """Fail now if a live process on this host holds the directory.

        This is the parent's check before it starts workers; a holder on another host is judged by rank 0, which may
        have to watch its heartbeat.
        """
        check_writable(self.run_dir)
        holder = Holder.parse(_read(self.path))
        if holder and holder.seen_from(self.me) and _alive_here(holder):
            raise self._busy(holder)

    def release(self, keep_dirs: bool = True) -> None:
        """Give the lock back (if it is still ours).

        Without ``keep_dirs``, also remove the directories ``acquire`` made, when they hold nothing else (a start that
        failed leaves no trace).
        """
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        if self._holds():
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

    def _current(self) -> Holder | None:
        """Who the lock file names, read up to ``READ_TRIES`` times before saying no one.

        One failed read (a network file system's passing error) is not a lost lock.
        """
        for attempt in range(READ_TRIES):
            try:
                holder = Holder.parse(self.path.read_bytes())
            except OSError:
                holder = None
            if holder is not None or attempt + 1 == READ_TRIES:
                return holder
            time.sleep(1.0)

    def _holds(self) -> bool:
        holder = self._current()
        return holder is not None and holder.token == self.me.token

    def _dead(self, holder: Holder, check_stop: Callable[[str], None]) -> str | None:
        """Why ``holder`` is gone; raises while it lives; None when the lock changed while it was watched."""
        if holder.seen_from(self.me):
            if _alive_here(holder):
                raise self._busy(holder)
            return "its process is gone"
        if holder.job is not None and holder.job == self.me.job and holder.attempt < self.me.attempt:
            return "an earlier attempt of this job"
        log.info("run.dir %s is locked by %s, on another host: watching its heartbeat for %.0f s", self.run_dir,
                 holder.describe(), STALE_S)
        before = self._mtime()
        self._wait(STALE_S, check_stop, f"watching the heartbeat of {holder.describe()}")
        now = Holder.parse(_read(self.path))
        if now is None or now.token != holder.token:
            return None
        if self._mtime() != before:
            raise self._busy(holder)
        return "its heartbeat stopped"

    def _abandoned(self, raw: bytes, check_stop: Callable[[str], None]) -> str | None:
        """Why a lock file that names no holder can be taken over.

        Raises while it may still be in use; None when it changed meanwhile (a writer finished it, or it was released).
        """
        deadline = time.monotonic() + WRITE_GRACE_S
        while time.monotonic() < deadline:
            self._wait(POLL_S, check_stop, f"reading {self.path}")
            if _read(self.path) != raw:
                return None
        modified = self._mtime()
        if modified is None:
            return None
        age = time.time() - modified
        if age >= STALE_S:
            return f"its lock file names no holder and nothing touched it for {age:.0f} s"
        what = "is empty" if not raw.strip() else "names no holder this version can read"
        raise UserError(
            f"run.dir={self.run_dir}: its lock file {self.path} {what} (a start killed while writing it, a full "
            f"disk, or another program's lock). If no job uses this directory, delete it; otherwise it is taken "
            f"over once nothing has touched it for {STALE_S:.0f} s (in {STALE_S - age:.0f} s)"
        )

    @staticmethod
    def _wait(seconds: float, check_stop: Callable[[str], None], doing: str) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            check_stop(doing)
            time.sleep(min(POLL_S, left))

    def _mtime(self) -> float | None:
        try:
            with open(self.path, "rb") as file:  # opening revalidates cached attributes on NFS
                return os.fstat(file.fileno()).st_mtime
        except OSError:
            return None

    def _break(self, raw: bytes) -> bool:
        """Move an abandoned lock file (whose bytes were ``raw``) aside; False if another start got there first."""
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{self.me.token}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        if _read(aside) != raw:  # a new holder's lock: put it back
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
            holder = self._current()
            if holder is not None and holder.token == self.me.token:
                try:
                    os.utime(self.path)
                except OSError:
                    pass
                continue
            if not self.lost:
                log.error("run.dir %s: the lock was taken over by %s; no more checkpoints are written", self.run_dir,
                          holder.describe() if holder else "no one (its file is gone or unreadable)")
            self.lost = True
