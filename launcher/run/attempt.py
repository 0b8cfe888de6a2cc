"""One attempt at the run in a run directory. Rank 0 holds the directory's lock, the wandb process and the records
for the attempt, and writes nothing into the directory until the start has passed every check: a start that fails
leaves no trace (not even the directory, if it made it) and no wandb run."""

from __future__ import annotations

import logging
from pathlib import Path

from launcher.checkpoint.files import save_model
from launcher.checkpoint.resume import Start
from launcher.checkpoint.sharded import model_weights
from launcher.config.build import with_run_dir
from launcher.distributed.env import DistEnv
from launcher.distributed.group import on_main
from launcher.recipe import Recipe
from launcher.run.directory import Ledger, run_dir_for
from launcher.run.lock import RunLock
from launcher.tracking.metrics import Records
from launcher.tracking.wandb import WandbRun, begin_wandb, spawn_wandb

log = logging.getLogger(__name__)


class Attempt:
    """This attempt's hold on the run directory: opened before anything is built, begun once every check passed,
    ended (or abandoned) in one of the designed ways."""

    def __init__(self, cfg, run_dir: Path, dist_env: DistEnv, lock: RunLock | None, wandb_run: WandbRun | None):
        self.cfg, self.run_dir, self.dist_env = cfg, run_dir, dist_env
        self.lock, self.wandb_run = lock, wandb_run
        self.ledger = Ledger(run_dir)
        self.records: Records | None = None  # rank 0, once begun
        self.number = 0  # this attempt's number in the run's history

    @classmethod
    def open(cls, cfg, recipe: Recipe, dist_env: DistEnv) -> "Attempt":
        """Collective: the run directory locked by rank 0 (a directory in use fails every rank, in one line)."""
        run_dir = run_dir_for(cfg, recipe)
        lock = RunLock(run_dir, dist_env.job_id) if dist_env.is_main else None
        on_main(dist_env, lock.acquire if lock else None)
        cfg = with_run_dir(cfg, str(run_dir))
        # wandb takes about a second to import, in its own process: while the model and data are built.
        wandb_run = spawn_wandb(cfg) if dist_env.is_main else None
        return cls(cfg, run_dir, dist_env, lock, wandb_run)

    def begin(self, start: Start) -> Records:
        """Rank 0, once every check passed: the ledger (a new run's identity, this attempt's start and changes),
        config.yaml, the records and the wandb run."""
        if start.new_run:
            self.ledger.create(start.run_id, self.cfg, start.started_from)
        resumed_from = {"checkpoint": start.checkpoint, "step": start.step} if start.checkpoint else None
        changes = {key: list(values) for key, values in start.changes.items()}
        self.number = self.ledger.start_attempt(self.cfg, self.dist_env.job_id, self.dist_env.world_size,
                                                resumed_from, changes)
        self.records = Records(self.run_dir / "metrics.jsonl", self.wandb_run)
        logged_through = self.records.last_step()  # by an earlier attempt: wandb has those steps already
        self.records.drop_after(start.step)
        if self.wandb_run:
            begin_wandb(self.wandb_run, self.cfg, self.run_dir, self.dist_env.job_group, logged_through)
        return self.records

    def complete(self, start: Start, payload: dict) -> None:
        """A run already trained as far as its config asks: rank 0 says so (and writes model.pt if it was lost),
        and the attempt ends without writing anything else."""
        if self.dist_env.is_main:
            model_file = self.run_dir / "model.pt"
            if not model_file.is_file():
                save_model(model_weights(Path(start.checkpoint), payload), model_file)
            log.info("run.dir %s is complete: %d steps, %d epochs (checkpoint %s); model: %s. To train longer raise "
                     "train.epochs; for a new run set run.name=<new name>", self.run_dir, start.step,
                     payload["epoch"] - 1, start.checkpoint, model_file)
        self.abandon()

    def abandon(self) -> None:
        """The start did not begin: no wandb run, and the directory as it was (gone, if this attempt made it)."""
        if self.wandb_run:
            self.wandb_run.finish()
        if self.lock:
            self.lock.release(keep_dirs=self.ledger.holds_run())

    def end(self, outcome: str, step: int, detail: str = "") -> None:
        """Rank 0: record how the attempt ended (finished, stopped, failed), let wandb finish, give the directory
        back."""
        if self.wandb_run:
            self.wandb_run.finish()
        if self.lock:
            self.ledger.end_attempt(self.number, outcome, step, detail)
            self.lock.release()
