"""The run directory's copy in ``ckpt.remote``, kept by a thread of rank 0's: a store that fails never stops training.

The thread uploads each published checkpoint (the newest waiting one: a newer supersedes it), ``best``, ``model.pt``
and the ledger files, and prunes the store's checkpoints as the run directory's are pruned. When the store fails it
warns once, retries with backoff, and the checkpoint waiting for it is kept on disk meanwhile.

One writer per prefix: ``holder.json`` names the process that writes it (``run/lock.py``'s ``Holder``), which rewrites
it every ``BEAT_S``. A start takes it over when its process is gone (same host), when it was an earlier attempt of
the same job, or when it has not been rewritten for ``STALE_S``; else it is refused. A writer that finds another's
holder stops uploading, and its run stops at the next checkpoint, as when it loses the run directory's lock.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import zlib
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from launcher.checkpoint.files import BadCheckpoint, _first_line, _write_atomic, file_crc32, step_files
from launcher.checkpoint.remote import RemoteStore
from launcher.errors import LauncherError, UserError
from launcher.run.directory import RECORD_FILES, Ledger
from launcher.run.lock import POLL_S, Holder, _alive_here

log = logging.getLogger(__name__)

HOLDER = "holder.json"
BEAT_S = 15.0
STALE_S = 60.0
BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)  # between tries while the store fails; the last repeats
EXIT_WAIT_S = 30.0  # how long a run's end waits for a store that fails before it leaves the rest to the next start
_KINDS = ("checkpoint", "best", "model", "ledger")  # the order of uploads: the ledger after what it speaks of


class Mirror:
    """Rank 0's copy of one run directory in ``ckpt.remote``."""

    def __init__(self, store: RemoteStore, run_dir: Path, me: Holder, keep: int):
        self.store, self.run_dir, self.me, self.keep = store, run_dir, me, keep
        self.run_id: str | None = None
        self.restored: dict | None = None  # what a start in an empty run directory took from the store
        self.lost = False  # another writer holds the prefix: nothing more is written to it
        self._held = False
        self._pending: dict[str, Path | bool] = {}  # kind -> what waits for its upload
        self._uploading: Path | None = None  # the checkpoint being uploaded: never pruned meanwhile
        self._ledger_crcs: dict[str, int] = {}  # of what was uploaded, not to upload it again unchanged
        self._wake = threading.Condition()
        self._closing_since: float | None = None
        self._failing = False
        self._thread: threading.Thread | None = None

    @classmethod
    def open(cls, cfg, run_dir: Path, job: str | None, attempt: tuple[int, int],
             check_stop: Callable[[str], None]) -> "Mirror | None":
        """Rank 0, the run directory locked: hold ``ckpt.remote``, and fill an empty run directory from it.

        None without ``ckpt.remote``. A store that cannot be reached is one line when the run directory holds no run
        (the store may hold it), else a warning: the run goes on, and the thread uploads once it is reachable.
        """
        if not cfg.ckpt.remote:
            return None
        mirror = cls(RemoteStore(cfg.ckpt.remote), run_dir, Holder.this_process(job, attempt), cfg.ckpt.keep)
        ledger = Ledger(run_dir)
        empty = not ledger.holds_run() and not step_files(run_dir / "checkpoints")
        try:
            mirror._claim(check_stop)
            remote_run = mirror._remote_run_id()
            if remote_run and remote_run != (ledger.run_id() or remote_run):
                raise UserError(f"ckpt.remote={mirror.store.url} holds run {remote_run}, but run.dir={run_dir} holds "
                                f"run {ledger.run_id()}: give each run its own ckpt.remote")
            if remote_run and empty:
                if cfg.ckpt.resume != "auto":
                    raise UserError(f"ckpt.remote={mirror.store.url} holds run {remote_run}: ckpt.resume="
                                    f"{cfg.ckpt.resume} would start another run over it; give the new run its own "
                                    "ckpt.remote (or continue that run with ckpt.resume=auto)")
                mirror.restored = mirror._restore(remote_run)
        except (UserError, BadCheckpoint):
            mirror.close(upload=False)
            raise
        except Exception as error:
            if empty:
                raise LauncherError(
                    f"ckpt.remote={mirror.store.url} cannot be reached ({_described(error)}): it may hold this run, "
                    f"so run.dir={run_dir}, which holds none, does not start it over. Run again once it is reachable "
                    "(or without ckpt.remote for a new run)") from None
            log.warning("ckpt.remote=%s cannot be reached (%s): training goes on, and the run's checkpoints are "
                        "uploaded once it is", mirror.store.url, _described(error))
        return mirror

    def _remote_run_id(self) -> str | None:
        raw = self.store.read("run.json")
        try:
            return json.loads(raw)["run_id"] if raw is not None else None
        except (ValueError, KeyError, TypeError):
            return None

    def _claim(self, check_stop: Callable[[str], None]) -> None:
        """Take ``holder.json``, or fail in one line while another writer lives (watched ``STALE_S`` at most)."""
        holder = Holder.parse(self.store.read(HOLDER))
        if holder is not None and holder.token != self.me.token and not self._gone(holder):
            if holder.seen_from(self.me):
                raise self._busy(holder)
            log.info("ckpt.remote=%s is written by %s: watching its heartbeat for %.0f s", self.store.url,
                     holder.describe(), STALE_S)
            before, deadline = self.store.modified(HOLDER), time.monotonic() + STALE_S
            while time.monotonic() < deadline:
                check_stop(f"watching the heartbeat of {holder.describe()} in ckpt.remote")
                time.sleep(POLL_S)
            if self.store.modified(HOLDER) != before:
                raise self._busy(holder)
            log.info("ckpt.remote=%s: took over from %s (its heartbeat stopped)", self.store.url, holder.describe())
        self._beat()

    def _gone(self, holder: Holder) -> bool:
        """Whether ``holder`` is known gone without watching it: its process, an earlier attempt, or stale."""
        if holder.seen_from(self.me):
            return not _alive_here(holder)
        if holder.job is not None and holder.job == self.me.job and holder.attempt < self.me.attempt:
            return True
        modified = self.store.modified(HOLDER)
        return modified is None or time.time() - modified >= STALE_S

    def _busy(self, holder: Holder) -> UserError:
        return UserError(f"ckpt.remote={self.store.url} is written by another job ({holder.describe()}): one job at "
                         f"a time per prefix. Wait for it to end, or give this run another ckpt.remote. If that job "
                         f"is dead, delete {self.store.url}/{HOLDER}")

    def _beat(self) -> None:
        self.store.write(HOLDER, json.dumps(asdict(self.me)).encode())
        self._held = True

    def _hold(self) -> None:
        """The thread, before it writes: the prefix is still ours (rewrite the heartbeat), else ``lost``."""
        holder = Holder.parse(self.store.read(HOLDER))
        if holder is None or holder.token == self.me.token or (not self._held and self._gone(holder)):
            self._beat()
            return
        if not self.lost:
            log.error("ckpt.remote=%s was taken over by %s; nothing more is uploaded", self.store.url,
                      holder.describe())
        self.lost = True

    def _restore(self, run_id: str) -> dict:
        """Fill the empty run directory from the store: the newest checkpoint that verifies, ``best``, the ledger."""
        folder, restored = self.run_dir / "checkpoints", None
        for name in self.store.checkpoint_names():
            if (self.store.manifest(name) or {}).get("run_id") != run_id:
                continue
            try:
                self.store.download_checkpoint(name, folder)
                restored = name
                break
            except BadCheckpoint as error:
                log.warning("ckpt.remote=%s: checkpoint %s is corrupt (%s); trying the one before", self.store.url,
                            name, error)
        for best in ("best.pt", "best"):
            if restored and self.store.manifest(best) is not None:
                try:
                    self.store.download_checkpoint(best, folder)
                except BadCheckpoint as error:
                    log.warning("ckpt.remote=%s: %s is corrupt (%s); not restored", self.store.url, best, error)
        for name in sorted(RECORD_FILES, key=lambda name: name == "run.json"):  # run.json last: the run is here
            data = self.store.read(name)
            if data is not None:
                _write_atomic(self.run_dir / name, lambda file, data=data: file.write(data))
        log.info("run.dir %s held no run: restored run %s from ckpt.remote=%s (%s)", self.run_dir, run_id,
                 self.store.url, f"checkpoint {restored}" if restored else "no checkpoint verifies: step 0")
        return {"remote": self.store.url, "checkpoint": restored}

    def begin(self, run_id: str, checkpoint: Path | None) -> None:
        """The attempt begins: start the thread; ``checkpoint``, the one it continues from, is uploaded if missing."""
        self.run_id = run_id
        if checkpoint is not None and checkpoint.parent == self.run_dir / "checkpoints":
            self._pending["checkpoint"] = checkpoint
        self._thread = threading.Thread(target=self._run, name="launcher-remote", daemon=True)
        self._thread.start()

    def checkpoint_published(self, path: Path, best: Path | None) -> None:
        """Upload checkpoint ``path`` (and ``best``, a copy of it) in the background, then the ledger."""
        with self._wake:
            self._pending.update(checkpoint=path, ledger=True, **({"best": best} if best else {}))
            self._wake.notify()

    def model_saved(self, path: Path) -> None:
        with self._wake:
            self._pending.update(model=path, ledger=True)
            self._wake.notify()

    def pinned(self) -> set[Path]:
        """Checkpoints local pruning must keep: the one being uploaded, and the one waiting."""
        with self._wake:
            return {path for path in (self._uploading, self._pending.get("checkpoint")) if path}

    def close(self, upload: bool = True) -> None:
        """Upload the ledger and what waits (at most ``EXIT_WAIT_S`` more while the store fails); give the prefix back.

        Without ``upload``, nothing more is uploaded: the start failed.
        """
        with self._wake:
            if upload:
                self._pending["ledger"] = True
            else:
                self._pending.clear()
            self._closing_since = time.monotonic()
            self._wake.notify()
        while self._thread is not None and self._thread.is_alive():  # one try of the store's may take long
            self._thread.join(POLL_S)
            if self._failing and time.monotonic() > self._closing_since + EXIT_WAIT_S:
                break  # a daemon thread: it ends with the process
        waiting = sorted(kind for kind, value in self._pending.items() if value)
        if waiting and not self.lost:
            log.warning("ckpt.remote=%s: not uploaded (%s); they are in run.dir %s, and the next start with this "
                        "ckpt.remote uploads them", self.store.url, ", ".join(waiting), self.run_dir)
        if self._held and not self.lost:
            try:
                if Holder.parse(self.store.read(HOLDER)) == self.me:
                    self.store.remove(HOLDER)
            except Exception:
                pass  # a heartbeat that stops is a holder gone, STALE_S later

    def _run(self) -> None:
        tries, next_beat = 0, time.monotonic()
        while not self.lost:
            with self._wake:
                while not self._pending and self._closing_since is None and time.monotonic() < next_beat:
                    self._wake.wait(next_beat - time.monotonic())
                if self._closing_since is not None and not self._pending:
                    return
            try:
                self._hold()
                next_beat = time.monotonic() + BEAT_S
                if not self.lost:
                    self._upload_waiting()
            except Exception as error:
                if not self._failing:
                    log.warning("ckpt.remote=%s cannot be reached (%s): training goes on; the checkpoint waiting "
                                "is kept in run.dir and uploaded once it can be", self.store.url, _described(error))
                self._failing, tries = True, tries + 1
                if not self._wait_to_retry(BACKOFF_S[min(tries, len(BACKOFF_S)) - 1]):
                    return
                continue
            if self._failing:
                log.info("ckpt.remote=%s is reachable again: uploads caught up", self.store.url)
            self._failing, tries = False, 0

    def _wait_to_retry(self, seconds: float) -> bool:
        """Wait ``seconds`` before the next try (less once the run is ending); False when the end waited enough."""
        with self._wake:
            if self._closing_since is None:
                self._wake.wait(seconds)
            if self._closing_since is None:
                return True
            left = self._closing_since + EXIT_WAIT_S - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(seconds, left, BACKOFF_S[1]))
        return True

    def _upload_waiting(self) -> None:
        for kind in _KINDS:
            with self._wake:
                taken = self._pending.get(kind)
                if kind == "checkpoint":
                    self._uploading = taken
            if taken:
                self._upload(kind, taken)
            with self._wake:
                if self._pending.get(kind) == taken:
                    self._pending.pop(kind, None)
                self._uploading = None

    def _upload(self, kind: str, taken: Path | bool) -> None:
        if kind == "ledger":
            self._upload_ledger()
        elif not taken.exists():  # pruned or replaced since it was published: a newer one follows
            return
        elif kind == "model":
            self.store.upload(taken, "model.pt", [taken.stat().st_size, file_crc32(taken)])
        elif self.store.upload_checkpoint(taken, self.run_id) and kind == "checkpoint":
            self._prune()

    def _upload_ledger(self) -> None:
        for name in RECORD_FILES:
            path = self.run_dir / name
            if not path.is_file():
                continue
            data = path.read_bytes()
            crc = zlib.crc32(data)
            if self._ledger_crcs.get(name) != crc:
                self.store.write(name, data)
                self._ledger_crcs[name] = crc

    def _prune(self) -> None:
        """The store's checkpoints of this run beyond the newest ``ckpt.keep`` go, as the run directory's do."""
        ours = [name for name in self.store.checkpoint_names()
                if (self.store.manifest(name) or {}).get("run_id") == self.run_id]
        for old in ours[self.keep:]:
            self.store.remove_checkpoint(old)


def _described(error: BaseException) -> str:
    return f"{type(error).__name__}: {_first_line(error)}"
