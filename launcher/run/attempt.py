"""One attempt at the run in a run directory.

Rank 0 holds the directory's lock and the records for the attempt (metrics.jsonl and log.to's sinks: wandb's process,
TensorBoard, MLflow), and writes nothing into the directory until the start has passed every check: a start that fails
leaves no trace (not even the directory, if it made it) and no wandb or MLflow run. Nor does a new run that fails
before its first checkpoint (a recipe's error at the first step, a loss that is NaN from the start): nothing in it could
be continued from.
"""

from __future__ import annotations

import logging
from pathlib import Path

from launcher.checkpoint.checkpointer import Publisher
from launcher.checkpoint.files import save_model
from launcher.checkpoint.formats import format_of
from launcher.config.build import with_run_dir
from launcher.distributed.env import DistEnv
from launcher.distributed.group import on_main, run_agreed
from launcher.distributed.stop import StopSignals
from launcher.recipe import Recipe
from launcher.run.directory import RECORD_FILES, Ledger, run_dir_for
from launcher.run.lock import RunLock, check_shared
from launcher.run.mirror import Mirror
from launcher.run.start import Start
from launcher.tracking.metrics import Records
from launcher.tracking.sinks import open_sinks

log = logging.getLogger(__name__)



class Attempt(Publisher):
    """This attempt's hold on the run directory.

    It is opened before anything is built, begun once every check passed, and ended (or abandoned) in one of the
    designed ways. On rank 0 it hears of each checkpoint published (no more once the lock or ckpt.remote is lost).
    """

    def __init__(self, cfg, run_dir: Path, dist_env: DistEnv, lock: RunLock | None, mirror: Mirror | None,
                 records: Records | None):
        self.cfg, self.run_dir, self.dist_env = cfg, run_dir, dist_env
        self.lock, self.mirror = lock, mirror
        self.ledger = Ledger(run_dir)
        self.records = records  # rank 0's; its sinks start once begun
        self.number = 0  # this attempt's number in the run's history
        self.started: Start | None = None  # once begun

    @classmethod
    def open(cls, cfg, recipe: Recipe, dist_env: DistEnv, signals: StopSignals) -> "Attempt":
        """Collective: the run directory locked by rank 0 and seen by every rank.

        A directory in use, or one that is not shared by every node, fails every rank, in one line. A stop signal ends a
        wait for the lock. With ``ckpt.remote``, rank 0 also holds the store's prefix, and fills an empty run
        directory from it. Rank 0 also opens log.to's sinks: a library that cannot be imported fails every rank.
        """
        run_dir = run_dir_for(cfg, recipe)
        resolved = with_run_dir(cfg, str(run_dir))
        lock = RunLock(run_dir, dist_env.job_id, dist_env.attempt) if dist_env.is_main else None
        token = on_main(dist_env, lambda: lock.acquire(signals.check))
        opened: list = [None, None]  # the mirror, the records

        def open_mirror() -> None:
            opened[0] = Mirror.open(cfg, run_dir, dist_env.job_id, dist_env.attempt, signals.check)

        def open_records() -> None:
            # wandb's process starts here, importing wandb while the model and data are built.
            opened[1] = Records(run_dir / "metrics.jsonl", open_sinks(resolved, run_dir, dist_env.job_group))

        try:
            if dist_env.is_distributed:
                run_agreed(dist_env, lambda: check_shared(run_dir, token))
            run_agreed(dist_env, open_records if dist_env.is_main else None, name_rank=False)
            run_agreed(dist_env, open_mirror if dist_env.is_main else None, name_rank=False)
        except BaseException:
            if opened[1]:
                opened[1].close("failed")
            if lock:
                lock.release(keep_dirs=Ledger(run_dir).holds_run())
            raise
        return cls(resolved, run_dir, dist_env, lock, opened[0], opened[1])

    def begin(self, start: Start) -> Records:
        """Rank 0, once every check passed: begin the attempt.

        It writes the ledger (a new run's identity, this attempt's start and changes) and config.yaml, and starts the
        records: metrics.jsonl from the resume step on, and each sink's run (a new one, or the one it continues).
        """
        self.started = start
        for stale in self.run_dir.glob(".*.tmp"):  # a killed attempt's half-written model.pt or ledger; ours now
            stale.unlink(missing_ok=True)
        if start.new_run:
            self.ledger.create(start.run_id, self.cfg, start.started_from)
        resumed_from = {"checkpoint": start.checkpoint, "step": start.step} if start.checkpoint else None
        changes = {key: list(values) for key, values in start.changes.items()}
        restored = self.mirror.restored if self.mirror else None
        self.number = self.ledger.start_attempt(self.cfg, self.dist_env.job_id, self.dist_env.world_size,
                                                resumed_from, changes, restored)
        if self.mirror:
            self.mirror.begin(Path(start.checkpoint) if start.checkpoint else None)
        self.records.start(start.step)
        return self.records

    def complete(self, start: Start, saved: dict) -> None:
        """A run already trained as far as its config asks.

        Rank 0 says so (and writes model.pt if it was lost), and the attempt ends without writing anything else.
        """
        if self.dist_env.is_main:
            model_file = self.run_dir / "model.pt"
            checkpoint = Path(start.checkpoint)
            if not model_file.is_file():
                save_model(format_of(checkpoint).weights(checkpoint, saved), model_file)
            if self.mirror:  # what an earlier attempt could not upload
                self.mirror.begin(checkpoint)
                self.mirror.model_saved(model_file)
            log.info("run.dir %s is complete: %d steps, %d epochs (checkpoint %s); model: %s. To train longer raise "
                     "train.epochs; for a new run set run.name=<new name>", self.run_dir, start.step,
                     saved["epoch"] - 1, start.checkpoint, model_file)
        self.abandon()

    def abandon(self) -> None:
        """The start failed: no wandb or MLflow run, and the directory as it was.

        The directory is gone if this attempt made it; after ``begin``, the attempt ends as failed.
        """
        if self.started is not None:
            self.end("failed", self.started.step, "the start failed", checkpointed=False)
            return
        if self.records:
            self.records.close("failed")  # never started: nothing of them is left
        if self.mirror:
            self.mirror.close(upload=self.mirror.identity is not None)  # a complete run's model.pt
        if self.lock:
            self.lock.release(keep_dirs=self.ledger.holds_run())

    def refusal(self) -> str | None:
        return (self.lock.lost if self.lock else None) or (self.mirror.lost if self.mirror else None)

    def published(self, path: Path, best: Path | None) -> None:
        if self.mirror:
            self.mirror.checkpoint_published(path, best)

    def pinned(self) -> set[Path]:
        return self.mirror.pinned() if self.mirror else set()

    def model_saved(self, path: Path) -> None:
        """Rank 0: model.pt is in place."""
        if self.records:
            self.records.model_saved(path)
        if self.mirror:
            self.mirror.model_saved(path)

    def uploads_done(self) -> None:
        """Rank 0, as the run ends: wait (bounded) for what waits for ckpt.remote."""
        if self.mirror:
            self.mirror.drain()

    def end(self, outcome: str, step: int, detail: str = "", checkpointed: bool = True) -> None:
        """Rank 0: record how the attempt ended, close the sinks (wandb finishes), give the directory back.

        The attempt ended finished, stopped or failed. A new run that failed before its first checkpoint (not
        ``checkpointed``) is taken away instead.
        """
        discard = outcome == "failed" and not checkpointed and self.started is not None and self.started.new_run
        if self.records:
            self.records.close(outcome, discard)  # a discarded run's sinks take their folders (wandb/...) with them
        if not self.lock:
            return
        if discard:
            for name in RECORD_FILES:
                (self.run_dir / name).unlink(missing_ok=True)
            try:
                (self.run_dir / "checkpoints").rmdir()  # made by a save that failed; never another's checkpoints
            except OSError:
                pass
            if self.mirror:
                self.mirror.close(upload=False)
            self.lock.release(keep_dirs=False)
            return
        self.ledger.end_attempt(self.number, outcome, step, detail)
        if self.mirror:
            self.mirror.close()  # the ledger's end, and what still waits, uploaded before the directory is given back
        self.lock.release()
