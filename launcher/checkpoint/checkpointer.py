"""The Checkpointer: what a checkpoint holds (every rank's state), written by rank 0 for every rank (or, with a
sharded model, by every rank its shards and rank 0 the rest), and kept newest first within the run's own lineage."""

from __future__ import annotations

import math
import os
import platform
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

import launcher
from launcher.checkpoint.files import (
    SHARDED_META,
    STEP_PREFIX,
    _first_line,
    _tensors,
    _write_atomic,
    lineage,
    publish_folder,
    remove_checkpoint,
    restore_set_aside,
    save_atomic,
    step_files,
)
from launcher.checkpoint.sharded import check_complete, save_shards
from launcher.distributed.env import DistEnv
from launcher.distributed.fsdp import shards_model
from launcher.distributed.group import run_agreed
from launcher.errors import LauncherError, UserError


class TrainingDiverged(UserError):
    """The loss stopped being a finite number: nothing after it is worth keeping."""


def capture_rng(device: torch.device) -> dict:
    """This process's random states, in types ``torch.load(..., weights_only=True)`` accepts."""
    numpy_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": numpy_state["state"]["pos"],
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        },
    }


@dataclass
class Position:
    """Where training stands: the epoch in progress, optimizer steps of it done, steps overall; the best eval metric
    so far and the step of the last checkpoint."""

    epoch: int = 1
    step_in_epoch: int = 0
    global_step: int = 0
    best: float | None = None
    saved_step: int = -1


def training_state(trainer) -> dict:
    """What a checkpoint holds of the trainer besides the model and optimizer state: the same on every rank."""
    where = trainer.position
    scaler = trainer.precision.scaler
    return {
        "scheduler": trainer.scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler else None,
        "epoch": where.epoch,
        "samples_in_epoch": where.step_in_epoch * trainer.cfg.train.batch_size,
        "global_step": where.global_step,
        "best": where.best,
    }


class Checkpointer:
    """Writes ``<run.dir>/checkpoints/step_<global step>.pt`` (and ``best.pt``) for run ``run_id``, or with a sharded
    model the folders ``step_<global step>/`` (and ``best/``), and keeps the newest ``ckpt.keep`` of that run's own:
    a checkpoint it cannot read, or another run's, it never deletes."""

    def __init__(self, run_dir: Path, cfg, dist_env: DistEnv, run_id: str, lock=None):
        self.folder = run_dir / "checkpoints"
        self.cfg, self.dist_env, self.run_id = cfg, dist_env, run_id
        self.sharded = shards_model(cfg)
        self.lock = lock  # rank 0's RunLock: no writes once it is lost
        self.last_good: Path | None = None  # the newest checkpoint of this run known to hold finite training

    def path_for(self, global_step: int) -> Path:
        return self.folder / f"{STEP_PREFIX}{global_step:09d}{'' if self.sharded else '.pt'}"

    @property
    def best_path(self) -> Path:
        return self.folder / ("best" if self.sharded else "best.pt")

    def save(self, trainer, best: bool = False) -> Path:
        """Collective: every rank hands in its own state (random streams, partial epoch loss); rank 0 writes one
        file with the trainer's state and every rank's (and, ``best``, its copy best.pt); all wait for it, and all
        fail together if it cannot be written.

        Before anything is written every rank sees every rank's state, so all refuse together: a non-finite loss
        (a diverged run is not worth a checkpoint) or a lost lock (another job owns the directory now).
        """
        rank_state = {"rng": capture_rng(trainer.device), "loss_sum": trainer.loss_sum.item()}
        lock_lost = bool(self.lock and self.lock.lost)
        gathered = [(rank_state, lock_lost)]
        if self.dist_env.is_distributed:
            gathered = [None] * self.dist_env.world_size
            dist.all_gather_object(gathered, (rank_state, lock_lost))
        rank_states = [state for state, _ in gathered]
        step = trainer.position.global_step
        if not all(math.isfinite(state["loss_sum"]) for state in rank_states):
            raise TrainingDiverged(self.diverged_message(step), same_on_all_ranks=True)
        if any(lost for _, lost in gathered):
            raise LauncherError(f"the lock on {self.folder.parent} was taken over by another job: stopped at step "
                                f"{step} without writing a checkpoint", same_on_all_ranks=True)
        path = self.path_for(step)
        meta = {
            **training_state(trainer),
            "run_id": self.run_id,
            "rank_states": rank_states,
            "world_size": self.dist_env.world_size,
            "config": OmegaConf.to_container(self.cfg),
            "versions": {"launcher": launcher.__version__, "torch": str(torch.__version__),
                         "python": platform.python_version()},
        }
        if self.sharded:
            self._save_sharded(trainer, meta, path, best)
        else:
            self._save_file(trainer, meta, path, best)
        self.last_good = path
        return path

    def _clear_stale(self) -> None:
        """What a writer that was killed left (temporary files and folders); the lock makes them ours."""
        restore_set_aside(self.folder)
        for stale in self.folder.glob(".*.tmp"):
            remove_checkpoint(stale)

    def _save_file(self, trainer, meta: dict, path: Path, best: bool) -> None:
        """Rank 0 writes every rank's state into one file; all wait for it, and all fail if it cannot be written."""

        def write() -> None:
            payload = {"model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict(), **meta}
            self._clear_stale()
            try:
                save_atomic(payload, path)
                if best:
                    self._save_best(path)
            except (OSError, RuntimeError) as error:  # torch's writer reports a full disk as "unexpected pos"
                raise LauncherError(self._write_failed(path, _bytes(payload), error)) from None
            self._prune()

        run_agreed(self.dist_env, write if self.dist_env.is_main else None, name_rank=False)  # all wait for the file

    def _save_sharded(self, trainer, meta: dict, path: Path, best: bool) -> None:
        """Every rank writes its shards into a temporary folder; rank 0 adds launcher.pt (with every file's size and
        CRC-32) and renames the folder into place once it is complete."""
        written = self.folder / f".{path.name}.tmp"
        run_agreed(self.dist_env, self._clear_stale if self.dist_env.is_main else None, name_rank=False)  # first
        try:
            files = save_shards(trainer.model, trainer.optimizer, written)
        except Exception as error:  # DCP raises every rank's failure on all ranks (ShardsFailed)
            needed = _bytes([trainer.model.state_dict(), trainer.optimizer.state_dict()]) * self.dist_env.world_size
            raise LauncherError(self._write_failed(path, needed, error), same_on_all_ranks=True) from None

        def publish() -> None:
            check_complete(written, files)
            try:
                save_atomic({**meta, "files": files}, written / SHARDED_META)
                publish_folder(written, path)
                if best:
                    self._save_best(path)
            except (OSError, RuntimeError) as error:  # torch's writer reports a full disk as "unexpected pos"
                raise LauncherError(self._write_failed(path, 0, error)) from None
            self._prune()

        run_agreed(self.dist_env, publish if self.dist_env.is_main else None, name_rank=False)

    def _write_failed(self, path: Path, needed: int, error: BaseException) -> str:
        free = shutil.disk_usage(self.folder).free
        reason = (f"no space left: {free / 2**20:.1f} MB free on its device, the checkpoint needs about "
                  f"{needed / 2**20:.1f} MB" if free < needed else f"{type(error).__name__}: {_first_line(error)}")
        kept = f"the previous checkpoint {self.last_good} is intact" if self.last_good else "no checkpoint was lost"
        return (f"writing checkpoint {path} failed ({reason}); {kept}. Free space (or lower ckpt.keep), then run the "
                "same command to continue")

    def diverged_message(self, step: int) -> str:
        last = f"the last good checkpoint is {self.last_good}" if self.last_good else "no checkpoint was written"
        return (f"training diverged: the loss is not a finite number at step {step}; {last}. Lower optim.lr "
                "(or clip with train.clip_grad_norm), or look for NaN or inf in the data")

    def _save_best(self, source: Path) -> None:
        """Keep a copy of ``source`` as best.pt, or best/ (atomically, like every checkpoint)."""
        if source.is_dir():  # hard links: instant, and a step folder's files never change once it is published
            copied = self.folder / ".best.tmp"
            shutil.copytree(source, copied, copy_function=_link_or_copy)
            publish_folder(copied, self.best_path)
            return

        def copy(file) -> None:
            with source.open("rb") as original:
                shutil.copyfileobj(original, file)

        _write_atomic(self.best_path, copy)

    def _prune(self) -> None:
        ours = [path for path in step_files(self.folder) if lineage(path) in (self.run_id, "")]
        for old in ours[self.cfg.ckpt.keep :]:
            remove_checkpoint(old)


def _link_or_copy(source: str, target: str) -> None:
    """A hard link, or a copy where the file system has none (some FUSE and object-store mounts)."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
        with open(target, "rb") as file:  # on disk before the folder is renamed into place, as the step's was
            os.fsync(file.fileno())


def _bytes(tree) -> int:
    """What the tensors in ``tree`` take (of a sharded one, this rank's shard)."""
    local = [t.to_local() if hasattr(t, "to_local") else t for t in _tensors(tree)]  # a DTensor's shard
    return sum(t.untyped_storage().nbytes() for t in local)
