"""One holder at a time: of a run directory (its ``.lock``) and of a ``ckpt.remote`` prefix (its ``holder.json``).

Both are a ``Lease``: a small file in a store (storage.py) naming its holder, taken by whoever creates it, kept by a
heartbeat, taken over only from a holder known to be gone. A holder is a process (host, PID namespace, pid and start
time), not a job: two starts in one Slurm allocation share a job id, and the second must not take the first's
directory. It is gone when
- it ran on this host, in this PID namespace, and its process is gone (a live one refuses the start); a holder in
  another container of this host, which may share its name but not its pids, counts as another host's;
- it was an earlier attempt of the same job (a lower Slurm requeue or torchrun restart count): the scheduler ends
  every process of an attempt before it starts the next, so a requeued job continues at once on any host;
- it ran on another host and its heartbeat (the file's modification time, moved every ``BEAT_S``) did not move while
  it was watched for ``STALE_S``: no clocks compared.
A file that names no holder (its writer killed between creating and writing it, a full disk, another program's) is
given ``WRITE_GRACE_S`` to be written, refused in one line while younger than ``STALE_S``, and taken over once older.
Every wait polls ``check_stop``, so a stop signal ends it.
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
from launcher.storage import FsspecStore, LocalFolder

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
BEAT_S = 10.0
STALE_S = 60.0
WRITE_GRACE_S = 2.0
POLL_S = 0.2
READ_TRIES = 3  # reads of its own file, a second apart, before a holder concludes it lost it
SHARED_WAIT_S = 10.0  # how long a rank looks for rank 0's lock (a network file system may show it late)


@dataclass(frozen=True)
class Holder:
    """Who holds a lease: enough to tell whether it is alive, and to name it in an error."""

    host: str
    pid: int
    started: str  # the process's start time as the kernel counts it: a reused pid has another
    job: str | None
    attempt: tuple[int, int]  # of the job, when it took the lease (DistEnv.attempt)
    token: str
    since: str
    pid_namespace: str = ""  # whose pids ``pid`` counts in: containers on one host may share its name, not its pids

    @classmethod
    def this_process(cls, job: str | None, attempt: tuple[int, int] = (0, 0)) -> "Holder":
        return cls(socket.gethostname(), os.getpid(), _process_start(os.getpid()) or "", job, tuple(attempt),
                   secrets.token_hex(8), time.strftime("%Y-%m-%d %H:%M:%S"), _pid_namespace())

    def seen_from(self, other: "Holder") -> bool:
        """Whether ``other`` can tell by the pid alone if this holder lives.

        It can on the same host, in the same PID namespace (an earlier version's file names none: its host's own).
        """
        return self.host == other.host and (not self.pid_namespace or self.pid_namespace == other.pid_namespace)

    @classmethod
    def parse(cls, raw: bytes | None) -> "Holder | None":
        """The holder a file's bytes name, or None.

        None for none: missing, empty, truncated, another format, a pid that is no process's. A file of an earlier
        version, without ``attempt``, still names its holder.
        """
        try:
            fields = json.loads(raw)
            holder = cls(str(fields["host"]), int(fields["pid"]), str(fields["started"]), fields["job"],
                         tuple(int(n) for n in fields.get("attempt", (0, 0))), str(fields["token"]),
                         str(fields["since"]), str(fields.get("pid_namespace", "")))
        except (ValueError, TypeError, KeyError, OverflowError):  # JSONDecodeError is a ValueError
            return None
        return holder if holder.pid > 0 else None

    def describe(self) -> str:
        job = f"job {self.job}, " if self.job else ""
        return f"{job}pid {self.pid} on {self.host}, since {self.since}"


def _pid_namespace() -> str:
    """This process's PID namespace ("pid:[4026531836]"), or "" where there is no procfs to say."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (field 22 of /proc/<pid>/stat); None for none alive (a zombie is not)."""
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


class LeaseLost(Exception):
    """The lease is another holder's now (``Lease.lost`` says whose)."""


class Lease:
    """This process's hold on the file ``name`` in ``store`` (storage.py): ``acquire``, a heartbeat, ``release``.

    ``place`` names what it guards in messages ("run.dir=runs/x"), ``instead`` what to give a second job instead
    ("another run.name or run.dir"). ``lost`` says why it is no longer this process's (None while it is).
    """

    def __init__(self, store: LocalFolder | FsspecStore, name: str, me: Holder, place: str, instead: str):
        self.store, self.name, self.me, self.place, self.instead = store, name, me, place, instead
        self.mine = json.dumps(asdict(me)).encode()
        self.held = False
        self.lost: str | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(self, check_stop: Callable[[str], None] = lambda doing: None) -> None:
        """Take the lease, or fail in one line while another holder lives (watched ``STALE_S`` at most)."""
        while not self.store.replace(self.name, None, self.mine):
            raw = self.store.read(self.name)
            if raw is None:  # given back meanwhile: try again
                continue
            holder = Holder.parse(raw)
            reason = self._gone(holder, check_stop) if holder else self._abandoned(raw, check_stop)
            if reason is not None and self.store.replace(self.name, raw, self.mine):
                log.info("%s: took over from %s (%s)", self.place, holder.describe() if holder else "no one", reason)
                break
        self.held = True
        self._beat = threading.Thread(target=self._heartbeat, name=f"launcher-lease-{self.name}", daemon=True)
        self._beat.start()

    def check(self) -> None:
        """Raise ``LeaseLost`` unless the file still names this holder.

        One that vanished (deleted by hand, a store that lost its objects) is taken again; one failed read (a network
        file system's passing error) is not a lost lease.
        """
        for attempt in range(READ_TRIES):
            raw = self.store.read(self.name)
            if raw is None and self.store.replace(self.name, None, self.mine):
                return
            holder = Holder.parse(raw)
            if holder is not None or attempt + 1 == READ_TRIES:
                break
            time.sleep(1.0)
        if holder is None or holder.token != self.me.token:
            if self.lost is None:
                by = f"another job ({holder.describe()})" if holder else "no one (its file is gone or unreadable)"
                self.lost = f"{self.place} was taken over by {by}"
                log.error("%s; nothing more is written there", self.lost)
            raise LeaseLost(self.lost)

    def release(self, wait_s: float | None = None) -> None:
        """Give the lease back, if it is still this process's, waiting at most ``wait_s`` for the store."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join(wait_s)

    def busy(self, holder: Holder) -> UserError:
        return UserError(f"{self.place} is in use by another job ({holder.describe()}): wait for it to end, or give "
                         f"this run {self.instead}. If that job is dead, delete {self.store.location(self.name)}")

    def _heartbeat(self) -> None:
        while not self._stop.wait(BEAT_S):
            try:
                self.check()
                self.store.touch(self.name, self.mine)
            except LeaseLost:
                return
            except Exception:  # a store that fails: its next beat may reach it
                pass
        try:
            if self.lost is None and Holder.parse(self.store.read(self.name)) == self.me:
                self.store.remove(self.name)
        except Exception:  # a heartbeat that stops is a holder gone, STALE_S later
            pass

    def _gone(self, holder: Holder, check_stop: Callable[[str], None]) -> str | None:
        """Why ``holder`` is gone; raises while it lives; None when the file changed while it was watched."""
        if holder.seen_from(self.me):
            if _alive_here(holder):
                raise self.busy(holder)
            return "its process is gone"
        if holder.job is not None and holder.job == self.me.job and holder.attempt < self.me.attempt:
            return "an earlier attempt of this job"
        log.info("%s is held by %s, on another host: watching its heartbeat for %.0f s", self.place,
                 holder.describe(), STALE_S)
        before = self.store.modified(self.name)
        _wait(STALE_S, check_stop, f"watching the heartbeat of {holder.describe()}")
        now = Holder.parse(self.store.read(self.name))
        if now is None or now.token != holder.token:
            return None
        if self.store.modified(self.name) != before:
            raise self.busy(holder)
        return "its heartbeat stopped"

    def _abandoned(self, raw: bytes, check_stop: Callable[[str], None]) -> str | None:
        """Why a file that names no holder can be taken over.

        Raises while it may still be in use; None when it changed meanwhile (written, or given back).
        """
        deadline = time.monotonic() + WRITE_GRACE_S
        while time.monotonic() < deadline:
            _wait(POLL_S, check_stop, f"reading {self.store.location(self.name)}")
            if self.store.read(self.name) != raw:
                return None
        modified = self.store.modified(self.name)
        if modified is None:
            return None
        age = time.time() - modified
        if age >= STALE_S:
            return f"its file names no holder and nothing touched it for {age:.0f} s"
        what = "is empty" if not raw.strip() else "names no holder this version can read"
        raise UserError(
            f"{self.place}: {self.store.location(self.name)} {what} (a start killed while writing it, a full disk, "
            f"or another program's). If no job uses it, delete it; otherwise it is taken over once nothing has "
            f"touched it for {STALE_S:.0f} s (in {STALE_S - age:.0f} s)"
        )


def _wait(seconds: float, check_stop: Callable[[str], None], doing: str) -> None:
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        check_stop(doing)
        time.sleep(min(POLL_S, left))


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


class RunLock:
    """The lease on one run directory, taken by rank 0 for the whole job; ``lost`` once another job took it."""

    def __init__(self, run_dir: Path, job: str | None, attempt: tuple[int, int] = (0, 0)):
        self.run_dir = run_dir
        self.me = Holder.this_process(job, attempt)
        self.lease = Lease(LocalFolder(run_dir), LOCK_NAME, self.me, f"run.dir={run_dir}",
                           "another run.name or run.dir")
        self.created: list[Path] = []  # directories this lock made, removed again if the start fails

    @property
    def lost(self) -> str | None:
        return self.lease.lost

    def acquire(self, check_stop: Callable[[str], None] = lambda doing: None) -> str:
        """Take the lock (making the directory if needed), or fail in one line; returns its token.

        Every wait calls ``check_stop(what it waits for)``, which raises to end it (a stop signal).
        """
        check_writable(self.run_dir)
        missing = [folder for folder in (self.run_dir, *self.run_dir.parents) if not folder.exists()]
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"run.dir={self.run_dir} cannot be made ({error.strerror})") from None
        self.created = list(reversed(missing))  # outermost first
        self.lease.acquire(check_stop)
        return self.me.token

    def check_free(self) -> None:
        """Fail now if a live process on this host holds the directory.

        This is the parent's check before it starts workers; a holder on another host is judged by rank 0, which may
        have to watch its heartbeat.
        """
        check_writable(self.run_dir)
        holder = Holder.parse(self.lease.store.read(LOCK_NAME))
        if holder and holder.seen_from(self.me) and _alive_here(holder):
            raise self.lease.busy(holder)

    def release(self, keep_dirs: bool = True) -> None:
        """Give the lock back.

        Without ``keep_dirs``, also remove the directories ``acquire`` made, when they hold nothing else (a start that
        failed leaves no trace).
        """
        self.lease.release()
        if not keep_dirs:
            for folder in reversed(self.created):
                try:
                    folder.rmdir()
                except OSError:  # not empty: something else lives there now
                    break
