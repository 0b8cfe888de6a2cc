"""Checkpoints: atomic state_dict files written by rank 0, kept newest-first, found again after any crash."""

from __future__ import annotations

import logging
import os
import platform
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

import launcher
from launcher.dist_env import DistEnv
from launcher.errors import UserError

log = logging.getLogger(__name__)

STEP_PREFIX = "step_"


def save_atomic(state: dict, path: Path) -> None:
    """``torch.save`` to a temporary file in the same directory, fsync, then rename over ``path``.

    A reader sees the old file or the new one, never a partial one; a writer killed half-way leaves only a
    ``.tmp`` file behind, which the next save removes.
    """
    _write_atomic(path, lambda file: torch.save(state, file))


def _write_atomic(path: Path, write) -> None:
    """``write(file)`` into a temporary file beside ``path``, fsync, rename over ``path``, fsync the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: Path) -> dict:
    """A checkpoint or a model state_dict, loaded on the CPU with ``weights_only=True``."""
    return torch.load(path, map_location="cpu", weights_only=True)


class Checkpointer:
    """Writes ``<run.dir>/checkpoints/step_<global step>.pt`` (and ``best.pt``), keeps the newest ``ckpt.keep``."""

    def __init__(self, run_dir: Path, cfg, dist_env: DistEnv):
        self.folder = run_dir / "checkpoints"
        self.cfg = cfg
        self.dist_env = dist_env

    def path_for(self, global_step: int) -> Path:
        return self.folder / f"{STEP_PREFIX}{global_step:09d}.pt"

    def step_files(self) -> list[Path]:
        """Step checkpoints, newest first."""
        return sorted(self.folder.glob(f"{STEP_PREFIX}*.pt"), reverse=True)

    def save(self, training_state: dict, rank_state: dict) -> Path:
        """Collective: every rank hands in its own state (RNG, ...); rank 0 writes one file; all wait for it."""
        rank_states = [rank_state]
        if self.dist_env.is_distributed:
            rank_states = [None] * self.dist_env.world_size if self.dist_env.is_main else None
            dist.gather_object(rank_state, rank_states, dst=0)
        path = self.path_for(training_state["global_step"])
        if self.dist_env.is_main:
            payload = {
                **training_state,
                "rank_states": rank_states,
                "world_size": self.dist_env.world_size,
                "config": OmegaConf.to_container(self.cfg),
                "versions": {"launcher": launcher.__version__, "torch": str(torch.__version__),
                             "python": platform.python_version()},
            }
            for stale in self.folder.glob(".*.tmp"):  # left by a writer that was killed
                stale.unlink(missing_ok=True)
            save_atomic(payload, path)
            self._prune()
        if self.dist_env.is_distributed:
            dist.barrier()
        return path

    def save_best(self, source: Path) -> None:
        """Rank 0: keep a copy of ``source`` as best.pt (atomically, like every checkpoint)."""

        def copy(file) -> None:
            with source.open("rb") as original:
                shutil.copyfileobj(original, file)

        _write_atomic(self.folder / "best.pt", copy)

    def _prune(self) -> None:
        for old in self.step_files()[self.cfg.ckpt.keep :]:
            old.unlink(missing_ok=True)

    def newest_loadable(self) -> tuple[Path, dict] | None:
        """The newest step checkpoint that loads; unreadable ones are skipped with a one-line warning."""
        for path in self.step_files():
            try:
                return path, load_checkpoint(path)
            except Exception as error:  # truncated or corrupt: any reader error means "not this one"
                log.warning("checkpoint %s is unreadable (%s: %s); trying the one before", path,
                            type(error).__name__, str(error).splitlines()[0] if str(error) else "")
        return None


def check_model_fits(model: torch.nn.Module, saved: dict, path: Path) -> None:
    """Fail with the first parameter whose name or shape differs between ``saved`` and ``model``."""
    current = model.state_dict()
    hint = "the model config changed since it was saved: use a new run.dir, or ckpt.resume=never"
    for name, tensor in current.items():
        if name not in saved:
            raise UserError(f"checkpoint {path} does not fit the model: it has no '{name}'; {hint}")
        if saved[name].shape != tensor.shape:
            raise UserError(
                f"checkpoint {path} does not fit the model: '{name}' is {list(saved[name].shape)} there but "
                f"{list(tensor.shape)} in the model this config builds; {hint}"
            )
    extra = [name for name in saved if name not in current]
    if extra:
        raise UserError(f"checkpoint {path} does not fit the model: the model has no '{extra[0]}'; {hint}")
