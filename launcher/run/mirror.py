"""The run directory's copy in ``ckpt.remote``, kept by a thread of rank 0's: a store that fails never stops training.

The thread uploads each published checkpoint (the newest waiting one: a newer supersedes it), ``best``, ``model.pt``
and the ledger files, and prunes the store's checkpoints as the run directory's are pruned. When the store fails it
warns once, retries with backoff, and the checkpoint waiting for it is kept on disk meanwhile.

One writer per prefix: ``holder.json`` is a lease, the run directory's lock's algorithm over the store
(run/lock.py). One run per prefix: the store's run is told by its run.json, uploaded before any checkpoint, else by
the identity every checkpoint's manifest carries (a run.json lost or unreadable). A writer that loses the prefix, or
finds another run in it, writes nothing more, and its run stops at the next checkpoint, as when it loses the run
directory's lock.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import zlib
from pathlib import Path
from typing import Callable

from launcher.checkpoint.files import BadCheckpoint
from launcher.checkpoint.formats import step_files
from launcher.checkpoint.remote import RemoteStore
from launcher.errors import LauncherError, UserError, described
from launcher.run.directory import RECORD_FILES, Ledger, identity_in
from launcher.run.lock import POLL_S, Holder, Lease, LeaseLost
from launcher.run.start import config_changes, fixed_keys
from launcher.storage import write_atomic

log = logging.getLogger(__name__)

HOLDER = "holder.json"
BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)  # between tries while the store fails; the last repeats
STALL_S = 600.0  # how long a run's end waits for an upload that completes nothing (a hung mount, a dead network)
_KINDS = ("checkpoint", "best", "model", "ledger")  # the order of uploads: the ledger after what it speaks of


class Mirror:
    """Rank 0's copy of one run directory in ``ckpt.remote``."""

    def __init__(self, store: RemoteStore, run_dir: Path, me: Holder, keep: int, end_wait_s: float = 30.0):
        self.store, self.run_dir, self.keep = store, run_dir, keep
        self.end_wait_s = end_wait_s  # ckpt.remote_wait_s: a run's end waits for a failing store this long in all
        self.lease = Lease(store, HOLDER, me, f"ckpt.remote={store.url}", "its own ckpt.remote")
        self.identity: dict | None = Ledger(run_dir).identity()  # the run's id and config (a new run's once begun)
        self.restored: dict | None = None  # what a start in an empty run directory took from the store
        self.refused: str | None = None  # why nothing more is written: another job or another run in the store
        self._checked = False  # the store's run was found to be this one (or none)
        self._pending: dict[str, Path | bool] = {}  # kind -> what waits for its upload
        self._asked: dict[str, int] = {}  # requests per kind: one made during an upload of that kind stays pending
        self._uploading: Path | None = None  # the checkpoint being uploaded: never pruned meanwhile
        self._uploaded: dict[str, int] = {}  # ledger file -> CRC-32 of what was uploaded, not to upload it again
        self._wake = threading.Condition()
        self._ending_since: float | None = None  # the run is ending: waits for the uploads, retries sooner
        self._closed = False
        self._failing = False
        self._progress = time.monotonic()  # when an upload last ended
        self._uploader: threading.Thread | None = None

    @property
    def lost(self) -> str | None:
        return self.refused or self.lease.lost

    @classmethod
    def open(cls, cfg, run_dir: Path, job: str | None, attempt: tuple[int, int],
             check_stop: Callable[[str], None]) -> "Mirror | None":
        """Rank 0, the run directory locked: hold ``ckpt.remote``, and fill an empty run directory from it.

        None without ``ckpt.remote``. A store that cannot be read is one line when the run directory holds no run
        (the store may hold it), else a warning: the run goes on, and the uploads catch up once it can be.
        """
        if not cfg.ckpt.remote:
            return None
        mirror = cls(RemoteStore(cfg.ckpt.remote), run_dir, Holder.this_process(job, attempt), cfg.ckpt.keep,
                     cfg.ckpt.remote_wait_s)
        empty = mirror.identity is None and not step_files(run_dir / "checkpoints")
        try:
            mirror.lease.acquire(check_stop)
            mirror._check_run(cfg)
        except LauncherError:  # refused, or a stop signal during the watch
            mirror.close(upload=False)
            raise
        except Exception as error:  # from the store, or the disk it downloads to: said in one line either way
            if empty:
                mirror.close(upload=False)
                raise LauncherError(
                    f"ckpt.remote={mirror.store.url} cannot be read ({described(error)}): it may hold this run, so "
                    f"run.dir={run_dir}, which holds none, does not start it over. Run again once it can be read (or "
                    "without ckpt.remote for a new run)") from None
            log.warning("ckpt.remote=%s cannot be read (%s): training goes on, and the run's checkpoints are "
                        "uploaded once it can be", mirror.store.url, described(error))
        return mirror

    def _check_run(self, cfg=None) -> None:
        """The store's run is this run directory's, or none; an empty run directory is filled from it.

        Refused before anything is written: another run's, or one this config does not continue.
        """
        stored, url = self._stored_identity(), self.store.url
        if stored is not None and self.identity is not None and stored["run_id"] != self.identity["run_id"]:
            raise UserError(f"ckpt.remote={url} holds run {stored['run_id']}, but run.dir={self.run_dir} holds run "
                            f"{self.identity['run_id']}: give each run its own ckpt.remote")
        if stored is not None and self.identity is None:  # no run.json: a new machine, or a restore cut short
            if cfg.ckpt.resume != "auto":
                raise UserError(f"ckpt.remote={url} holds run {stored['run_id']}: ckpt.resume={cfg.ckpt.resume} "
                                "would start another run over it; give the new run its own ckpt.remote (or continue "
                                "that run with ckpt.resume=auto)")
            changes = config_changes(stored["config"], cfg)
            if fixed := fixed_keys(changes):
                listed = ", ".join(f"{key} {changes[key][0]} -> {changes[key][1]}" for key in fixed)
                raise UserError(f"ckpt.remote={url} holds run {stored['run_id']}, another run than this config's "
                                f"({listed}): give this run its own ckpt.remote, or set them back to continue that run")
            self.restored = self._restore(stored)
            self.identity = stored
        self._checked = True

    def _stored_identity(self) -> dict | None:
        """The store's run (``run_id``, ``config``): its run.json's, else its newest manifest's; None for none.

        Checkpoints, or a run.json, that name no run are one line.
        """
        raw = self.store.read("run.json")
        if identity := identity_in(raw):
            return identity
        names = self.store.checkpoint_names()
        found = next((identity for name in names if (identity := identity_in(self.store.manifest(name)))), None)
        if found is None and (raw is not None or names):
            what = "its run.json does not parse" if raw is not None else "it holds checkpoints but no run.json"
            raise UserError(f"ckpt.remote={self.store.url}: {what}, and no checkpoint's manifest names its run: "
                            "delete what is there, or give this run its own ckpt.remote")
        return found

    def _restore(self, stored: dict) -> dict:
        """Fill the empty run directory from the store: its run's newest checkpoint that verifies, best, the ledger.

        The ledger is read first and written last (run.json last of all, rebuilt from the manifests if missing or
        unreadable): a restore cut short leaves a directory that holds no run, which the next start restores again.
        """
        ledger = {name: data for name in RECORD_FILES if (data := self.store.read(name)) is not None}
        if identity_in(ledger.get("run.json")) != stored:
            rebuilt = {**stored, "created": None, "started_from": None, "rebuilt_from": "ckpt.remote's manifests"}
            ledger["run.json"] = (json.dumps(rebuilt, indent=1) + "\n").encode()
        folder, restored = self.run_dir / "checkpoints", None
        for name in self.store.checkpoint_names():
            if (self.store.manifest(name) or {}).get("run_id", stored["run_id"]) != stored["run_id"]:
                continue  # another run's
            restored = self._download(name, folder)
            if restored:
                break
        for best in ("best.pt", "best"):
            if restored and self.store.manifest(best) is not None:
                self._download(best, folder)
        for name in sorted(ledger, key=lambda name: name == "run.json"):
            write_atomic(self.run_dir / name, lambda file, data=ledger[name]: file.write(data))
        log.info("run.dir %s held no run: restored run %s from ckpt.remote=%s (%s)", self.run_dir, stored["run_id"],
                 self.store.url, f"checkpoint {restored}" if restored else "no checkpoint verifies: step 0")
        return {"remote": self.store.url, "checkpoint": restored}

    def _download(self, name: str, folder: Path) -> str | None:
        """Checkpoint ``name`` downloaded and verified, or None after one line on why it is not."""
        try:
            self.store.download_checkpoint(name, folder)
            return name
        except BadCheckpoint as error:
            log.warning("ckpt.remote=%s: checkpoint %s is corrupt (%s); not restored", self.store.url, name, error)
            return None

    def begin(self, checkpoint: Path | None) -> None:
        """The attempt begins, its run recorded: upload, ``checkpoint`` first (the one it continues from)."""
        self.identity = Ledger(self.run_dir).identity()
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

        The wait ends early when the store fails for ``end_wait_s``, or no upload ends for ``STALL_S``: what is left
        waits in the run directory for the next start.
        """
        with self._wake:
            said, self._ending_since = self._ending_since is not None, self._ending_since or time.monotonic()
            self._wake.notify()
        while self._pending and self.lost is None and self._uploader is not None and self._uploader.is_alive():
            time.sleep(POLL_S)  # one try of the store's may take long
            if self._failing and not said:
                log.warning("ckpt.remote=%s fails: the run's end waits for it %.0f s at most", self.store.url,
                            self.end_wait_s)
                said = True
            now = time.monotonic()
            if (self._failing and now > self._ending_since + self.end_wait_s
                    or now > max(self._ending_since, self._progress) + STALL_S):
                return

    def close(self, upload: bool = True) -> None:
        """Upload the ledger and what waits (as ``drain`` does), then give the prefix back.

        While the store fails, all within ``end_wait_s`` of the end. Without ``upload`` (a failed start), nothing more
        is uploaded.
        """
        if upload:
            self._ask(ledger=True)
            self.drain()
        with self._wake:
            if not upload:
                self._pending.clear()
            self._closed = True
            self._wake.notify()
        waiting = sorted(self._pending) if self._uploader is not None else []
        if waiting and self.lost is None:
            log.warning("ckpt.remote=%s: not uploaded (%s); they are in run.dir %s, and the next start with this "
                        "ckpt.remote uploads them", self.store.url, ", ".join(waiting), self.run_dir)
        ending = self._ending_since or time.monotonic()
        self.lease.release(max(0.0, ending + self.end_wait_s - time.monotonic()) if self._failing else self.end_wait_s)

    def _upload_until_closed(self) -> None:
        tries = 0
        while self.lost is None:
            with self._wake:
                while not self._pending and not self._closed and self.lost is None:
                    self._wake.wait()
                if self._closed and not self._pending or self.lost is not None:
                    return
            try:
                self._ready()
                self._upload_waiting()
            except LeaseLost:
                return
            except UserError as refused:  # another job holds the prefix, or another run is in it
                self.refused = str(refused)
                log.error("%s; nothing more is uploaded", refused)
                return
            except Exception as error:
                if not self._failing:
                    log.warning("ckpt.remote=%s: an upload failed (%s): training goes on; the checkpoint waiting is "
                                "kept in run.dir and the upload retried", self.store.url, described(error))
                self._failing, tries = True, tries + 1
                if not self._wait_to_retry(BACKOFF_S[min(tries, len(BACKOFF_S)) - 1]):
                    return
                continue
            if self._failing:
                log.info("ckpt.remote=%s is reachable again: uploads caught up", self.store.url)
            self._failing, tries = False, 0

    def _wait_to_retry(self, seconds: float) -> bool:
        """Wait ``seconds`` before the next try (2 s at most once the run ends); False when the end waited enough."""
        with self._wake:
            self._wake.wait(seconds if self._ending_since is None else min(seconds, BACKOFF_S[1]))
            ending = self._ending_since
        return not self._closed and (ending is None or time.monotonic() < ending + self.end_wait_s)

    def _ready(self) -> None:
        """Before uploads: the prefix held, its run this one (checked once), run.json there before any checkpoint.

        A store that could not be read at the start is taken and checked now.
        """
        if not self.lease.held:
            self.lease.acquire(self._ending)
        if not self._checked:
            self._check_run()
        self._upload_record("run.json")

    def _ending(self, doing: str) -> None:  # a wait for the prefix ends with the run
        if self._closed:
            raise LeaseLost(f"the run ended while {doing}")

    def _upload_waiting(self) -> None:
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
            for name in RECORD_FILES:
                self._upload_record(name)
            return
        if not taken.exists():  # pruned or replaced since it was published: a newer one follows
            return
        uploaded = self.store.upload_checkpoint(taken, self.identity, self.lease.check,
                                                under="" if kind == "model" else "checkpoints")
        if uploaded and kind == "checkpoint":
            self.lease.check()
            self._prune()

    def _upload_record(self, name: str) -> None:
        """Upload the ledger's file ``name``, unless it is missing or uploaded already as it is."""
        path = self.run_dir / name
        if not path.is_file():
            return
        data = path.read_bytes()
        if self._uploaded.get(name) != (crc := zlib.crc32(data)):
            self.lease.check()
            self.store.write(name, data)
            self._uploaded[name] = crc

    def _prune(self) -> None:
        """The store's checkpoints of this run beyond the newest ``ckpt.keep`` go, as the run directory's do."""
        manifests = ((name, self.store.manifest(name)) for name in self.store.checkpoint_names())
        ours = [(name, manifest) for name, manifest in manifests
                if (manifest or {}).get("run_id") == self.identity["run_id"]]
        for old, manifest in ours[self.keep:]:
            self.store.remove_checkpoint(old, manifest)
