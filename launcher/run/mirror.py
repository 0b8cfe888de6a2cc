"""The run directory's copy in ``ckpt.remote``, kept by threads of rank 0's: a store that fails never stops training.

One thread uploads each published checkpoint (the newest waiting one: a newer supersedes it), ``best``, ``model.pt``
and the ledger files, and prunes the store's checkpoints as the run directory's are pruned. When the store fails it
warns once, retries with backoff, and the checkpoint waiting for it is kept on disk meanwhile.

One writer per prefix: ``holder.json`` names the process that writes it (``run/lock.py``'s ``Holder``); another thread
rewrites it every ``BEAT_S`` from the start to the end, whatever the uploads are doing. A start takes it over when its
process is gone (same host) or when it was an earlier attempt of the same job, and else watches it: taken over when
nothing rewrote it for ``STALE_S``, refused when something did (no clocks compared). A writer that finds another's
holder, or another run's ``run.json``, writes nothing more, and its run stops at the next checkpoint, as when it loses
the run directory's lock.
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

from launcher.checkpoint.files import BadCheckpoint, _first_line, _write_atomic
from launcher.checkpoint.formats import step_files
from launcher.checkpoint.remote import RemoteStore, StoreHoldsAnotherRun
from launcher.errors import LauncherError, UserError
from launcher.run.directory import RECORD_FILES, Ledger
from launcher.run.lock import POLL_S, Holder, _alive_here

log = logging.getLogger(__name__)

HOLDER = "holder.json"
BEAT_S = 15.0
STALE_S = 60.0
BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)  # between tries while the store fails; the last repeats
EXIT_WAIT_S = 30.0  # how long a run's end waits for a store that fails before it leaves the rest to the next start
STALL_S = 600.0  # how long a run's end waits for an upload that completes nothing (a hung mount, a dead network)
_KINDS = ("checkpoint", "best", "model", "ledger")  # the order of uploads: the ledger after what it speaks of


class _Lost(Exception):
    """The prefix is no longer this writer's."""


class Mirror:
    """Rank 0's copy of one run directory in ``ckpt.remote``."""

    def __init__(self, store: RemoteStore, run_dir: Path, me: Holder, keep: int):
        self.store, self.run_dir, self.me, self.keep = store, run_dir, me, keep
        self.run_id: str | None = Ledger(run_dir).run_id()  # a new run's, once it begins
        self.restored: dict | None = None  # what a start in an empty run directory took from the store
        self.lost: str | None = None  # why nothing more is written to the store (another writer, another run)
        self._held = False
        self._same_run = False  # the store's run.json was seen to be this run's (or absent)
        self._watched: tuple | None = None  # (token, modified, since) of another's holder, watched by the beat
        self._pending: dict[str, Path | bool] = {}  # kind -> what waits for its upload
        self._asked: dict[str, int] = {}  # requests per kind: one made during an upload of that kind stays pending
        self._uploading: Path | None = None  # the checkpoint being uploaded: never pruned meanwhile
        self._ledger_crcs: dict[str, int] = {}  # of what was uploaded, not to upload it again unchanged
        self._wake = threading.Condition()
        self._closing_since: float | None = None
        self._hurry_since: float | None = None  # the run is ending: waits for the uploads, retries sooner
        self._failing = False
        self._progress = time.monotonic()  # when an upload last ended
        self._uploader: threading.Thread | None = None
        self._stop_beat = threading.Event()
        self._beater: threading.Thread | None = None

    @classmethod
    def open(cls, cfg, run_dir: Path, job: str | None, attempt: tuple[int, int],
             check_stop: Callable[[str], None]) -> "Mirror | None":
        """Rank 0, the run directory locked: hold ``ckpt.remote``, and fill an empty run directory from it.

        None without ``ckpt.remote``. A store that cannot be reached is one line when the run directory holds no run
        (the store may hold it), else a warning: the run goes on, and the threads catch up once it is reachable.
        """
        if not cfg.ckpt.remote:
            return None
        mirror = cls(RemoteStore(cfg.ckpt.remote), run_dir, Holder.this_process(job, attempt), cfg.ckpt.keep)
        empty = mirror.run_id is None and not step_files(run_dir / "checkpoints")
        try:
            mirror._claim(check_stop)
            remote_run = mirror._remote_run_id()
            if remote_run and mirror.run_id and remote_run != mirror.run_id:
                raise UserError(f"ckpt.remote={mirror.store.url} holds run {remote_run}, but run.dir={run_dir} holds "
                                f"run {mirror.run_id}: give each run its own ckpt.remote")
            if remote_run and mirror.run_id is None:  # no run.json: a new machine, or a restore cut short
                if cfg.ckpt.resume != "auto":
                    raise UserError(f"ckpt.remote={mirror.store.url} holds run {remote_run}: ckpt.resume="
                                    f"{cfg.ckpt.resume} would start another run over it; give the new run its own "
                                    "ckpt.remote (or continue that run with ckpt.resume=auto)")
                mirror.restored = mirror._restore(remote_run)
                mirror.run_id = remote_run
            mirror._same_run = mirror.run_id is not None or remote_run is None
        except LauncherError:  # refused, or a stop signal during the watch
            mirror.close(upload=False)
            raise
        except Exception as error:  # from the store, or the disk it downloads to: said in one line either way
            if empty:
                mirror.close(upload=False)
                raise LauncherError(
                    f"ckpt.remote={mirror.store.url} cannot be reached ({_described(error)}): it may hold this run, "
                    f"so run.dir={run_dir}, which holds none, does not start it over. Run again once it is reachable "
                    "(or without ckpt.remote for a new run)") from None
            log.warning("ckpt.remote=%s cannot be reached (%s): training goes on, and the run's checkpoints are "
                        "uploaded once it is", mirror.store.url, _described(error))
        mirror._beater = threading.Thread(target=mirror._beat_until_closed, name="launcher-remote-holder",
                                          daemon=True)
        mirror._beater.start()
        return mirror

    def _remote_run_id(self) -> str | None:
        raw = self.store.read("run.json")
        try:
            return json.loads(raw)["run_id"] if raw is not None else None
        except (ValueError, KeyError, TypeError):
            return None

    def _claim(self, check_stop: Callable[[str], None]) -> None:
        """Take ``holder.json``, or fail in one line while another writer lives (watched ``STALE_S`` at most)."""
        while True:
            holder = Holder.parse(self.store.read(HOLDER))
            if holder is None or holder.token == self.me.token or self._gone(holder):
                break
            if holder.seen_from(self.me):
                raise self._busy(holder)
            log.info("ckpt.remote=%s is written by %s: watching its heartbeat for %.0f s", self.store.url,
                     holder.describe(), STALE_S)
            before, deadline = self.store.modified(HOLDER), time.monotonic() + STALE_S
            while time.monotonic() < deadline:
                check_stop(f"watching the heartbeat of {holder.describe()} in ckpt.remote")
                time.sleep(POLL_S)
            now = Holder.parse(self.store.read(HOLDER))
            if now is None or now.token != holder.token:
                continue  # given back, or taken, meanwhile: judge it again
            if self.store.modified(HOLDER) != before:
                raise self._busy(holder)
            log.info("ckpt.remote=%s: took over from %s (its heartbeat stopped)", self.store.url, holder.describe())
            break
        self._beat()

    def _gone(self, holder: Holder) -> bool:
        """Whether ``holder`` is known gone without watching it: its process here, or an earlier attempt of the job."""
        if holder.seen_from(self.me):
            return not _alive_here(holder)
        return holder.job is not None and holder.job == self.me.job and holder.attempt < self.me.attempt

    def _busy(self, holder: Holder) -> UserError:
        return UserError(f"ckpt.remote={self.store.url} is written by another job ({holder.describe()}): one job at "
                         f"a time per prefix. Wait for it to end, or give this run another ckpt.remote. If that job "
                         f"is dead, delete {self.store.url}/{HOLDER}")

    def _beat(self) -> None:
        self.store.write(HOLDER, json.dumps(asdict(self.me)).encode())
        self._held = True

    def _lose(self, why: str) -> None:
        if self.lost is None:
            log.error("%s; nothing more is uploaded", why)
        self.lost = why
        with self._wake:
            self._wake.notify()
        raise _Lost(why)

    def _beat_until_closed(self) -> None:
        """The holder's heartbeat, from the start to the end; then the holder is given back."""
        while not self._stop_beat.wait(BEAT_S if self._held else BACKOFF_S[2]):
            try:
                self._hold()
            except _Lost:
                return
            except Exception:
                pass  # the store fails: the uploads say so
        self._release()

    def _release(self) -> None:
        """Give the prefix back, if it is still this writer's."""
        try:
            if self._held and self.lost is None and Holder.parse(self.store.read(HOLDER)) == self.me:
                self.store.remove(HOLDER)
        except Exception:
            pass  # a heartbeat that stops is a holder gone, STALE_S later

    def _hold(self) -> None:
        """Rewrite the heartbeat while the prefix is this run's; take it once it is free; else lose it."""
        holder = Holder.parse(self.store.read(HOLDER))
        if holder is not None and holder.token != self.me.token:
            if self._held:
                self._lose(f"ckpt.remote={self.store.url} was taken over by another job ({holder.describe()})")
            if not (self._gone(holder) or self._stale(holder)):
                return
        if not self._same_run and self.run_id is not None:
            remote_run = self._remote_run_id()
            if remote_run not in (None, self.run_id):
                self._lose(f"ckpt.remote={self.store.url} holds run {remote_run}, not this run ({self.run_id})")
            self._same_run = True
        self._beat()

    def _stale(self, holder: Holder) -> bool:
        """The beat's watch of another's holder: True once nothing rewrote it for ``STALE_S``; loses to a live one."""
        modified = self.store.modified(HOLDER)
        seen = (holder.token, modified)
        if self._watched is None or self._watched[:2] != seen:
            if self._watched is not None and self._watched[0] == holder.token:
                self._lose(f"ckpt.remote={self.store.url} is written by another job ({holder.describe()})")
            self._watched = (*seen, time.monotonic())
            return False
        return time.monotonic() - self._watched[2] >= STALE_S

    def _still_ours(self) -> None:
        """Before each write that publishes something: the holder is still this writer's, else lose it.

        A holder that is gone (deleted by hand, or a store that lost its objects) is taken again.
        """
        holder = Holder.parse(self.store.read(HOLDER))
        if holder is None:
            self._beat()
        elif holder.token != self.me.token:
            self._lose(f"ckpt.remote={self.store.url} was taken over by another job ({holder.describe()})")

    def _restore(self, run_id: str) -> dict:
        """Fill the empty run directory from the store: the newest checkpoint that verifies, ``best``, the ledger.

        The ledger is read first and written last (run.json last of all): a restore cut short leaves a directory that
        holds no run, which the next start restores again.
        """
        ledger = {name: data for name in RECORD_FILES if (data := self.store.read(name)) is not None}
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
        for name in sorted(ledger, key=lambda name: name == "run.json"):
            _write_atomic(self.run_dir / name, lambda file, data=ledger[name]: file.write(data))
        log.info("run.dir %s held no run: restored run %s from ckpt.remote=%s (%s)", self.run_dir, run_id,
                 self.store.url, f"checkpoint {restored}" if restored else "no checkpoint verifies: step 0")
        return {"remote": self.store.url, "checkpoint": restored}

    def begin(self, run_id: str, checkpoint: Path | None) -> None:
        """The attempt begins: start uploading; ``checkpoint``, the one it continues from, is uploaded if missing."""
        self.run_id = run_id
        if checkpoint is not None and checkpoint.parent == self.run_dir / "checkpoints":
            self._ask(checkpoint=checkpoint)
        self._uploader = threading.Thread(target=self._upload_until_closed, name="launcher-remote", daemon=True)
        self._uploader.start()

    def checkpoint_published(self, path: Path, best: Path | None) -> None:
        """Upload checkpoint ``path`` (and ``best``, a copy of it) in the background, then the ledger."""
        self._ask(checkpoint=path, ledger=True, **({"best": best} if best else {}))

    def model_saved(self, path: Path) -> None:
        self._ask(model=path, ledger=True)

    def _ask(self, **uploads) -> None:
        with self._wake:
            self._pending.update(uploads)
            for kind in uploads:
                self._asked[kind] = self._asked.get(kind, 0) + 1
            self._wake.notify()

    def pinned(self) -> set[Path]:
        """Checkpoints local pruning must keep: the one being uploaded, and the one waiting."""
        with self._wake:
            return {path for path in (self._uploading, self._pending.get("checkpoint")) if path}

    def drain(self) -> None:
        """Wait for what waits to be uploaded, as a run ends (a stop's checkpoint before exit 75 included).

        The wait ends early when the store fails for ``EXIT_WAIT_S``, or no upload ends for ``STALL_S``: what is left
        waits in the run directory for the next start.
        """
        with self._wake:
            self._hurry_since = self._hurry_since or time.monotonic()
            self._wake.notify()
        while self._pending and self.lost is None and self._uploader is not None and self._uploader.is_alive():
            time.sleep(POLL_S)  # one try of the store's may take long
            now = time.monotonic()
            if (self._failing and now > self._hurry_since + EXIT_WAIT_S
                    or now > max(self._hurry_since, self._progress) + STALL_S):
                return

    def close(self, upload: bool = True) -> None:
        """Upload the ledger and what waits (as ``drain`` does), then give the prefix back.

        Without ``upload`` (a failed start), nothing more is uploaded.
        """
        if upload:
            self._ask(ledger=True)
            self.drain()
        with self._wake:
            if not upload:
                self._pending.clear()
            self._closing_since = time.monotonic()
            self._wake.notify()
        waiting = sorted(self._pending) if self._uploader is not None else []
        if waiting and self.lost is None:
            log.warning("ckpt.remote=%s: not uploaded (%s); they are in run.dir %s, and the next start with this "
                        "ckpt.remote uploads them", self.store.url, ", ".join(waiting), self.run_dir)
        self._stop_beat.set()
        if self._beater is not None:
            self._beater.join(EXIT_WAIT_S)
        else:  # a start refused before the heartbeat began
            self._release()

    def _upload_until_closed(self) -> None:
        tries = 0
        while self.lost is None:
            with self._wake:
                while not self._pending and self._closing_since is None and self.lost is None:
                    self._wake.wait()
                if self._closing_since is not None and not self._pending or self.lost is not None:
                    return
            try:
                self._upload_waiting()
            except _Lost:
                return
            except Exception as error:
                if not self._failing:
                    log.warning("ckpt.remote=%s: an upload failed (%s): training goes on; the checkpoint waiting is "
                                "kept in run.dir and the upload retried", self.store.url, _described(error))
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
            if self._hurry_since is None:
                self._wake.wait(seconds)
            if self._closing_since is None and self._hurry_since is None:
                return True
            if self._closing_since is not None:
                return False  # the end waited enough: a daemon thread, it ends with the process
            left = self._hurry_since + EXIT_WAIT_S - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(seconds, left, BACKOFF_S[1]))
        return True

    def _upload_waiting(self) -> None:
        if not self._held:
            raise OSError("the prefix is not held yet")
        for kind in _KINDS:
            with self._wake:
                taken, asked = self._pending.get(kind), self._asked.get(kind)
                if kind == "checkpoint":
                    self._uploading = taken
            if taken:
                self._upload(kind, taken)
                self._progress = time.monotonic()
            with self._wake:
                if self._asked.get(kind) == asked:  # not asked again meanwhile
                    self._pending.pop(kind, None)
                self._uploading = None

    def _upload(self, kind: str, taken: Path | bool) -> None:
        if kind == "ledger":
            self._upload_ledger()
            return
        if not taken.exists():  # pruned or replaced since it was published: a newer one follows
            return
        try:
            uploaded = self.store.upload_checkpoint(taken, self.run_id, self._still_ours,
                                                    under="" if kind == "model" else "checkpoints")
        except StoreHoldsAnotherRun as error:
            self._lose(str(error))
        if uploaded and kind == "checkpoint":
            self._still_ours()
            self._prune()

    def _upload_ledger(self) -> None:
        for name in RECORD_FILES:
            path = self.run_dir / name
            if not path.is_file():
                continue
            data = path.read_bytes()
            crc = zlib.crc32(data)
            if self._ledger_crcs.get(name) != crc:
                self._still_ours()
                self.store.write(name, data)
                self._ledger_crcs[name] = crc

    def _prune(self) -> None:
        """The store's checkpoints of this run beyond the newest ``ckpt.keep`` go, as the run directory's do."""
        manifests = ((name, self.store.manifest(name)) for name in self.store.checkpoint_names())
        ours = [(name, manifest) for name, manifest in manifests if (manifest or {}).get("run_id") == self.run_id]
        for old, manifest in ours[self.keep:]:
            self.store.remove_checkpoint(old, manifest)


def _described(error: BaseException) -> str:
    return f"{type(error).__name__}: {_first_line(error)}"
