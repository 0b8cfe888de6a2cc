"""Resuming: which checkpoint (ckpt.resume), and putting its state back into a freshly built training state."""

from __future__ import annotations

import logging
from pathlib import Path

import torch.distributed as dist

from launcher.checkpoint import Checkpointer, check_model_fits, load_checkpoint
from launcher.dist_env import DistEnv
from launcher.errors import UserError
from launcher.rng import restore_rng

log = logging.getLogger(__name__)


def is_checkpoint(payload: dict) -> bool:
    """A training checkpoint, as opposed to a bare model state_dict such as model.pt."""
    return "global_step" in payload and "model" in payload


def choose_checkpoint(cfg, checkpointer: Checkpointer, dist_env: DistEnv, allow_model: bool = False):
    """Collective: the file to resume from (``ckpt.resume``) on every rank, or None; and its payload where rank 0
    already loaded it while looking.

    ``auto`` takes the newest step checkpoint that loads; ``allow_model`` (evaluation) also takes
    ``<run.dir>/model.pt`` when there is no checkpoint.
    """
    if cfg.ckpt.resume == "never":
        return None, None
    if cfg.ckpt.resume != "auto":
        return Path(cfg.ckpt.resume), None
    choice, payload = [None], None
    if dist_env.is_main:
        found = checkpointer.newest_loadable()
        model_file = checkpointer.folder.parent / "model.pt"
        if found:
            choice, payload = [str(found[0])], found[1]
        elif allow_model and model_file.is_file():
            choice = [str(model_file)]
    if dist_env.is_distributed:
        dist.broadcast_object_list(choice, src=0)
    return (Path(choice[0]) if choice[0] else None), payload


def load_for_resume(path: Path) -> dict:
    try:
        return load_checkpoint(path)
    except Exception as error:  # truncated, corrupt, or not a torch file at all
        raise UserError(f"ckpt.resume: {path} does not load ({type(error).__name__}: {error})") from None


def restore(state, payload: dict, path: Path, cfg, dist_env: DistEnv) -> None:
    """Put a checkpoint back: weights, optimizer, position in the epoch, this rank's random streams."""
    if not is_checkpoint(payload):
        raise UserError(f"{path} is a model state_dict, not a checkpoint: evaluate it with eval.only=true")
    check_model_fits(state.model, payload["model"], path)
    state.model.load_state_dict(payload["model"])
    try:
        state.optimizer.load_state_dict(payload["optimizer"])
    except (ValueError, KeyError) as error:
        raise UserError(f"checkpoint {path}: the optimizer state does not fit optim.name={cfg.optim.name} "
                        f"and the recipe's param_groups ({error})") from None
    state.scheduler.load_state_dict(payload["scheduler"])
    if state.precision.scaler and payload.get("scaler"):
        state.precision.scaler.load_state_dict(payload["scaler"])
    samples = payload["samples_in_epoch"]
    if samples % cfg.train.batch_size:
        raise UserError(
            f"checkpoint {path} stopped {samples} samples into an epoch, which is not a whole number of "
            f"train.batch_size={cfg.train.batch_size} batches: resume with the batch size it was saved with"
        )
    state.epoch, state.step_in_epoch = payload["epoch"], samples // cfg.train.batch_size
    state.global_step, state.best = payload["global_step"], payload["best"]
    state.saved_step = state.global_step
    if payload["world_size"] == dist_env.world_size:
        rank_state = payload["rank_states"][dist_env.rank]
        restore_rng(rank_state["rng"], state.device)
        state.loss_sum.fill_(rank_state["loss_sum"])
    elif dist_env.is_main:
        log.warning("resuming on %d processes from a checkpoint of %d: the data order continues exactly, the "
                    "per-rank random streams start afresh", dist_env.world_size, payload["world_size"])
