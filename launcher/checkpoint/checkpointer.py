"""The Checkpointer: what a checkpoint holds, who writes it, and which are kept.

A checkpoint holds every rank's state. Rank 0 writes it for every rank (or, with a sharded model, every rank writes its
shards and rank 0 the rest), and checkpoints are kept newest first within the run's own lineage.
"""

from __future__ import annotations

import errno
import math
import platform
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

import launcher
from launcher.checkpoint.background import BackgroundWrite, Snapshots
from launcher.checkpoint.files import (
    SHARDED_META,
    STEP_PREFIX,
    check_model_fits,
    publish_folder,
    restore_set_aside,
    save_atomic,
    tensors,
)
from launcher.checkpoint.formats import FORMATS, remove_checkpoint, run_id_of, step_files
from launcher.checkpoint.sharded import (
    ShardsFailed,
    check_complete,
    save_shards,
    save_shards_in_background,
)
from launcher.distributed.env import DistEnv
from launcher.distributed.group import run_agreed
from launcher.errors import LauncherError, UserError, described, first_line


class TrainingDiverged(UserError):
    """The loss stopped being a finite number: nothing after it is worth keeping."""


class Publisher:
    """Who hears of the checkpoints a rank publishes: rank 0's attempt (run/attempt.py), or no one."""

    def refusal(self) -> str | None:
        """Why no checkpoint may be written now (another job took the run directory or ckpt.remote), or None."""
        return None

    def published(self, path: Path, best: Path | None) -> None:
        """Checkpoint ``path`` is in place (and ``best``, a copy of it)."""

    def pinned(self) -> set[Path]:
        """Checkpoints pruning must keep (one ckpt.remote has yet to upload)."""
        return set()


class Checkpointer:
    """Writes the checkpoints of run ``run_id`` and removes old ones.

    It writes ``<run.dir>/checkpoints/step_<global step>.pt`` (and ``best.pt``), or with a sharded model the folders
    ``step_<global step>/`` (and ``best/``), and keeps the newest ``ckpt.keep`` of that run's own: a checkpoint it
    cannot read, or another run's, it never deletes.
    """

    def __init__(self, run_dir: Path, cfg, dist_env: DistEnv, run_id: str, checkpoint_format: str = "file",
                 publisher: Publisher | None = None):
        self.folder = run_dir / "checkpoints"
        self.cfg, self.dist_env, self.run_id = cfg, dist_env, run_id
        self.format = FORMATS[checkpoint_format]  # a file, or a folder of shards: the strategy's
        self.publisher = publisher or Publisher()  # rank 0: the attempt
        self.last_good: Path | None = None  # the newest checkpoint of this run known to hold finite training
        self.in_background = bool(cfg.ckpt["async"])  # ckpt.async (a Python keyword: no attribute access)
        self._writing: BackgroundWrite | None = None  # this rank's write in flight
        self._snapshots = Snapshots()
        # Sharded saves in the background gather on a gloo group of their own while training's collectives go on.
        self._group = dist.new_group(backend="gloo") if self.in_background and self.format.sharded else None
        self._stager = _Stager(torch.cuda.is_available()) if self._group is not None else None

    def path_for(self, global_step: int) -> Path:
        return self.format.path(self.folder, f"{STEP_PREFIX}{global_step:09d}")

    @property
    def best_path(self) -> Path:
        return self.format.path(self.folder, "best")

    def save(self, model, optimizer, state, best: bool = False) -> Path:
        """Collective: write a checkpoint of ``model``, ``optimizer`` and the training ``state``.

        The state (engine/state.py) goes in with every rank's own part of it. All ranks wait for the checkpoint, and all
        fail together if it cannot be written.

        Before anything is written every rank sees every rank's state, so all refuse together: a non-finite loss
        (a diverged run is not worth a checkpoint) or a lost lock (another job owns the directory now).
        """
        rank_state, lock_lost = state.rank_state_dict(), self.publisher.refusal()
        failed = self._write_ended() if self.in_background else None  # the write before waits first: one in flight
        gathered = [(rank_state, lock_lost, failed)]
        if self.dist_env.is_distributed:
            gathered = [None] * self.dist_env.world_size
            dist.all_gather_object(gathered, (rank_state, lock_lost, failed))
        rank_states = [rank_state for rank_state, _, _ in gathered]
        step = state.position.global_step
        failures = [failed for _, _, failed in gathered if failed]
        if failures:
            raise LauncherError(failures[0], same_on_all_ranks=True)
        if not all(math.isfinite(rank_state["loss_sum"]) for rank_state in rank_states):
            raise TrainingDiverged(self.diverged_message(step), same_on_all_ranks=True)
        taken = next((lost for _, lost, _ in gathered if lost), None)
        if taken:
            raise LauncherError(f"{taken}: stopped at step {step} without writing a checkpoint",
                                same_on_all_ranks=True)
        path = self.path_for(step)
        meta = {
            **state.state_dict(),
            "run_id": self.run_id,
            "rank_states": rank_states,
            "world_size": self.dist_env.world_size,
            "config": OmegaConf.to_container(self.cfg),
            "versions": {"launcher": launcher.__version__, "torch": str(torch.__version__),
                         "python": platform.python_version()},
        }
        if self.in_background:
            (self._save_sharded_in_background if self.format.sharded else self._save_file_in_background)(
                model, optimizer, meta, path, best)
            return path
        (self._save_sharded if self.format.sharded else self._save_file)(model, optimizer, meta, path, best)
        self.last_good = path
        return path

    def finish(self) -> None:
        """Collective: wait for the checkpoint being written in the background, if any; all fail if it failed.

        Where the run must not go on without it: before model.pt, before a stop's exit.
        """
        if self.in_background:
            run_agreed(self.dist_env, self._finish_write)

    def _finish_write(self) -> None:
        failed = self._write_ended()
        if failed:
            raise LauncherError(failed)

    def _write_ended(self) -> str | None:
        """Wait for this rank's write in flight; its failure's message, or None."""
        writing, self._writing = self._writing, None
        return writing.wait() if writing else None

    def restore(self, path: Path, saved: dict, model, optimizer, state) -> None:
        """Put the checkpoint at ``path`` back into ``model``, ``optimizer`` and the training ``state``.

        ``saved`` is its file, or its folder's launcher.pt, loaded; what goes back is what ``save`` wrote.

        The optimizer's hyperparameters stay those of the config (and recipe) now in force: with an unchanged config
        they equal the saved ones, and a changed ``optim.lr``, schedule or momentum takes effect.
        """
        check_model_fits(model, self.format.shapes(path, saved), path)
        now = [{key: value for key, value in group.items() if key not in ("params", "lr", "initial_lr")}
               for group in optimizer.param_groups]
        try:
            self.format.restore(model, optimizer, path, saved)
        except (ValueError, KeyError, ShardsFailed) as error:
            raise UserError(f"checkpoint {path}: the optimizer state does not fit optim.name={self.cfg.optim.name} "
                            f"and the recipe's param_groups ({first_line(error)})") from None
        for group, hyperparameters in zip(optimizer.param_groups, now):
            group.update(hyperparameters)
        saved_ckpt = saved["config"]["ckpt"]
        same_best = (saved_ckpt["best_metric"], saved_ckpt["best_mode"]) == (self.cfg.ckpt.best_metric,
                                                                            self.cfg.ckpt.best_mode)
        state.load_state_dict(saved, self.dist_env.rank, self.dist_env.world_size, same_best)
        self.last_good = path

    def _clear_stale(self) -> None:
        """What a writer that was killed left (temporary files and folders); the lock makes them ours."""
        restore_set_aside(self.folder)
        for stale in self.folder.glob(".*.tmp"):
            remove_checkpoint(stale)

    def _save_file(self, model, optimizer, meta: dict, path: Path, best: bool) -> None:
        """Rank 0 writes every rank's state into one file; all wait for it, and all fail if it cannot be written."""

        def write() -> None:
            contents = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), **meta}
            self._clear_stale()
            try:
                save_atomic(contents, path)
                if best:
                    self._save_best(path)
            except (OSError, RuntimeError) as error:  # torch's writer reports a full disk as "unexpected pos"
                raise LauncherError(self._write_failed(path, _bytes(contents), error)) from None
            self._published(path, best)

        run_agreed(self.dist_env, write if self.dist_env.is_main else None, name_rank=False)  # all wait for the file

    def _save_file_in_background(self, model, optimizer, meta: dict, path: Path, best: bool) -> None:
        """Rank 0 copies every rank's state into host memory and has a thread write it; the others go on at once."""
        if not self.dist_env.is_main:
            return
        contents = {**self._snapshots.take({"model": model.state_dict(), "optimizer": optimizer.state_dict()}),
                    **meta}

        def write() -> None:
            self._clear_stale()
            try:
                save_atomic(contents, path)
                if best:
                    self._save_best(path)
            except (OSError, RuntimeError) as error:
                raise LauncherError(self._write_failed(path, _bytes(contents), error)) from None
            self._published(path, best)

        self._writing = BackgroundWrite(write, path.name)

    def _save_sharded(self, model, optimizer, meta: dict, path: Path, best: bool) -> None:
        """Write a folder checkpoint from every rank's shards.

        Every rank writes its shards into a temporary folder; rank 0 adds launcher.pt (with every file's size and
        CRC-32) and renames the folder into place once it is complete.
        """
        written = self.folder / f".{path.name}.tmp"
        run_agreed(self.dist_env, self._clear_stale if self.dist_env.is_main else None, name_rank=False)  # first
        try:
            files = save_shards(model, optimizer, written)
        except Exception as error:  # DCP raises every rank's failure on all ranks (ShardsFailed)
            needed = _bytes([model.state_dict(), optimizer.state_dict()]) * self.dist_env.world_size
            raise LauncherError(self._write_failed(path, needed, error), same_on_all_ranks=True) from None

        publish = lambda: self._publish_folder(written, files, meta, path, best)  # noqa: E731
        run_agreed(self.dist_env, publish if self.dist_env.is_main else None, name_rank=False)

    def _save_sharded_in_background(self, model, optimizer, meta: dict, path: Path, best: bool) -> None:
        """Every rank copies its shards into host memory; threads write them, and rank 0's publishes the folder."""
        written = self.folder / f".{path.name}.tmp"
        run_agreed(self.dist_env, self._clear_stale if self.dist_env.is_main else None, name_rank=False)  # first
        try:
            files = save_shards_in_background(model, optimizer, written, self._group, self._stager.for_save())
        except Exception as error:
            needed = _bytes([model.state_dict(), optimizer.state_dict()]) * self.dist_env.world_size
            raise LauncherError(self._write_failed(path, needed, error), same_on_all_ranks=True) from None

        def write() -> None:
            try:
                table = files()
            except Exception as error:
                raise LauncherError(self._write_failed(path, 0, error)) from None
            if self.dist_env.is_main:
                self._publish_folder(written, table, meta, path, best)

        self._writing = BackgroundWrite(write, path.name)

    def _publish_folder(self, written: Path, files: dict, meta: dict, path: Path, best: bool) -> None:
        """Rank 0: once every shard of ``written`` is there, add launcher.pt and rename the folder into place."""
        check_complete(written, files)
        try:
            save_atomic({**meta, "files": files}, written / SHARDED_META)
            publish_folder(written, path)
            if best:
                self._save_best(path)
        except (OSError, RuntimeError) as error:  # torch's writer reports a full disk as "unexpected pos"
            raise LauncherError(self._write_failed(path, 0, error)) from None
        self._published(path, best)

    def _write_failed(self, path: Path, needed: int, error: BaseException) -> str:
        free = shutil.disk_usage(self.folder).free
        full = free < needed or getattr(error, "errno", None) == errno.ENOSPC
        reason = (f"no space left: {free / 2**20:.1f} MB free on its device, the checkpoint needs about "
                  f"{needed / 2**20:.1f} MB" if full else described(error))
        kept = f"the previous checkpoint {self.last_good} is intact" if self.last_good else "no checkpoint was lost"
        then = "Free space (or lower ckpt.keep), then run" if full else "Run"
        return f"writing checkpoint {path} failed ({reason}); {kept}. {then} the same command to continue"

    def diverged_message(self, step: int) -> str:
        last = f"the last good checkpoint is {self.last_good}" if self.last_good else "no checkpoint was written"
        return (f"training diverged: the loss is not a finite number at step {step}; {last}. Lower optim.lr "
                "(or clip with train.clip_grad_norm), or look for NaN or inf in the data")

    def _save_best(self, source: Path) -> None:
        """Keep a copy of ``source`` as best.pt, or best/ (atomically, like every checkpoint)."""
        self.format.copy(source, self.best_path)

    def _published(self, path: Path, best: bool) -> None:
        """Rank 0, once ``path`` is in place: prune, and tell the publisher."""
        self.last_good = path
        self._prune()
        self.publisher.published(path, self.best_path if best else None)

    def _prune(self) -> None:
        """This run's checkpoints beyond the newest ``ckpt.keep`` go, but for one ckpt.remote has yet to upload."""
        ours = [path for path in step_files(self.folder) if run_id_of(path) in (self.run_id, "")]
        pinned = self.publisher.pinned()
        for old in ours[self.cfg.ckpt.keep :]:
            if old not in pinned:
                remove_checkpoint(old)


class _Stager:
    """DCP's stager into host memory, pinned on CUDA: one per run, which keeps its buffers for the next save.

    torch 2.10 and 2.11's stager closes itself after each copy (pytorch#170431, a leak fixed by clearing what it
    copies with), and one used again fails with ``KeyError: <class 'type'>``: there, each save gets a new one.
    """

    def __init__(self, pinned: bool):
        self.pinned = pinned
        self.kept = self._new()
        try:
            for _ in range(2):
                self.kept.stage({"probe": torch.zeros(1)})
        except KeyError:
            self.kept = None

    def for_save(self):
        return self.kept or self._new()

    def _new(self):
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        return DefaultStager(StagingOptions(use_pinned_memory=self.pinned, use_shared_memory=False,
                                            use_async_staging=False, use_non_blocking_copy=False))


def _bytes(tree) -> int:
    """What the tensors in ``tree`` take (of a sharded one, this rank's shard)."""
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors(tree)]  # a DTensor's shard
    return sum(t.untyped_storage().nbytes() for t in local)
