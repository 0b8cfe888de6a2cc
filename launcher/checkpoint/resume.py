"""How a start begins: a new run, or the run in run.dir continued from a checkpoint (``ckpt.resume``), with every
config change since that checkpoint either allowed, applied, or refused before anything is written."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from launcher.checkpoint.checkpointer import Position
from launcher.checkpoint.files import (
    BadCheckpoint,
    _first_line,
    check_model_fits,
    lineage,
    load_checkpoint,
    newest_good,
    shapes,
    step_files,
    step_of,
)
from launcher.checkpoint.sharded import ShardsFailed, load_shards, saved_shapes
from launcher.config.schema import ENGINE_DEFAULTS, applied_on_resume, changes_freely, leaves
from launcher.distributed.env import DistEnv
from launcher.distributed.group import on_main
from launcher.errors import UserError
from launcher.recipe import recipe_name
from launcher.run.directory import Ledger, new_run_id

log = logging.getLogger(__name__)

_MISSING = "(not set)"


@dataclass(frozen=True)
class Start:
    """How this attempt starts, decided by rank 0 and the same on every rank."""

    run_id: str
    new_run: bool  # the directory holds no run yet: this start records one
    checkpoint: str | None = None  # the checkpoint it continues from
    step: int = 0  # that checkpoint's global step
    started_from: str | None = None  # a checkpoint of another run that a new run starts from
    changes: dict = field(default_factory=dict)  # key -> (value in the checkpoint, value now)
    complete: bool = False  # the checkpoint already reached the end the config asks for

    def describe_changes(self) -> list[str]:
        """One line per changed key, saying what happens to it."""
        return [f"changed since the checkpoint: {key} {old} -> {new}"
                + (", applied to the restored optimizer and schedule" if applied_on_resume(key) else "")
                for key, (old, new) in self.changes.items()]


def is_checkpoint(payload: dict) -> bool:
    """A training checkpoint (a file, or a folder's launcher.pt), as opposed to a bare model state_dict such as
    model.pt."""
    return "global_step" in payload and ("model" in payload or "files" in payload)


def load_named(path: Path, key: str = "ckpt.resume", check_shards: bool = True) -> dict:
    """A checkpoint the user named: loaded and verified, or one line saying why not."""
    try:
        return load_checkpoint(path, check_shards)
    except BadCheckpoint as error:
        raise UserError(f"{key}={path} does not load ({error})") from None


def config_changes(saved: dict, cfg) -> dict[str, tuple]:
    """Keys whose value differs between a checkpoint's config and ``cfg``. A key the checkpoint lacks (added to the
    engine since) counts as unchanged while it holds the engine's default; recipes compare by name."""
    old, new, engine = dict(leaves(saved)), dict(leaves(OmegaConf.to_container(cfg))), dict(leaves(ENGINE_DEFAULTS))
    old["recipe"], new["recipe"] = recipe_name(str(old.get("recipe", ""))), recipe_name(cfg.recipe)
    changes = {}
    for key in sorted(old.keys() | new.keys()):
        before, after = old.get(key, engine.get(key, _MISSING)), new.get(key, _MISSING)
        if before != after:
            changes[key] = (before, after)
    return changes


def _refuse_changes(changes: dict, payload: dict, run_dir: Path) -> None:
    fixed = [key for key in changes if not changes_freely(key) and not applied_on_resume(key)]
    if "train.batch_size" in changes and payload["samples_in_epoch"]:
        fixed.append("train.batch_size")  # mid-epoch: the position is a number of whole batches of the old size
    if fixed:
        listed = ", ".join(f"{key} {changes[key][0]} -> {changes[key][1]}" for key in fixed)
        where = " (mid-epoch, where the position counts batches of the old size)" if "train.batch_size" in fixed else ""
        raise UserError(
            f"run.dir={run_dir} cannot continue with these keys changed since its checkpoint: {listed}{where}. "
            "They define the run: set them back to continue it, or start another run (run.name=<new name>, or "
            "another run.dir)"
        )


def _complete(payload: dict, cfg) -> bool:
    return payload["epoch"] > cfg.train.epochs or bool(cfg.train.max_steps and
                                                        payload["global_step"] >= cfg.train.max_steps)


def plan_start(cfg, run_dir: Path, dist_env: DistEnv) -> tuple[Start, dict | None]:
    """Collective: how this attempt starts (the same ``Start`` on every rank), and on rank 0 the checkpoint it
    continues from, already loaded and verified. Every refusal comes before anything is written."""
    loaded: dict = {}

    def decide() -> Start:
        start, payload = _decide(cfg, run_dir)
        loaded["payload"] = payload
        return start

    return on_main(dist_env, decide), loaded.get("payload")


def _decide(cfg, run_dir: Path) -> tuple[Start, dict | None]:
    ledger, folder = Ledger(run_dir), run_dir / "checkpoints"
    held = ledger.run_id()
    if cfg.ckpt.resume == "never":
        if held:
            raise UserError(
                f"ckpt.resume=never starts a run at step 0, but run.dir={run_dir} already holds run {held}: give the "
                "new run its own directory (run.name=<new name>, or another run.dir), or continue this one "
                "(ckpt.resume=auto)"
            )
        return Start(new_run_id(), new_run=True), None
    if cfg.ckpt.resume == "auto":
        found = newest_good(folder, held)
        if found is None:
            if step_files(folder):
                log.warning("no readable checkpoint of this run in %s: it starts again at step 0", folder)
            return Start(held or new_run_id(), new_run=held is None), None
        path, payload = found
        run_id, started_from = held or payload.get("run_id") or new_run_id(), None
    else:
        path = Path(cfg.ckpt.resume)
        payload = load_named(path)
        if not is_checkpoint(payload):
            raise UserError(f"ckpt.resume={path} is a model state_dict, not a checkpoint: evaluate it with "
                            "eval.only=true, or load it in the recipe's build_model to start from its weights")
        run_id, started_from = _continue_named(path, payload, ledger, folder)
    changes = config_changes(payload["config"], cfg)
    _refuse_changes(changes, payload, run_dir)
    start = Start(run_id, new_run=held is None, checkpoint=str(path), step=payload["global_step"],
                  started_from=started_from, changes=changes, complete=_complete(payload, cfg))
    return start, payload


def _continue_named(path: Path, payload: dict, ledger: Ledger, folder: Path) -> tuple[str, str | None]:
    """The run id a start from the named checkpoint ``path`` trains under, and the checkpoint of another run it
    starts from (None when it continues its own). Refused where training on would mix two runs' checkpoints or
    overwrite newer ones."""
    held, theirs = ledger.run_id(), payload.get("run_id")
    inside = path.resolve().parent == folder.resolve()
    if held is None:
        return (theirs or new_run_id(), None) if inside else (new_run_id(), str(path))
    if theirs and theirs != held:
        raise UserError(f"ckpt.resume={path} is a checkpoint of run {theirs}, but run.dir={ledger.run_dir} holds run "
                        f"{held}: continue from it in a new directory (run.name=<new name>, or another run.dir)")
    newest = max((step_of(p) for p in step_files(folder) if lineage(p) in (held, "")),
                 default=0)
    if payload["global_step"] < newest:
        raise UserError(
            f"ckpt.resume={path} is at step {payload['global_step']}, older than this run's newest checkpoint "
            f"(step {newest}): training on from it would overwrite the checkpoints after it. Continue from it in a "
            "new directory (run.name=<new name>, or another run.dir)"
        )
    return held, None


def restore(trainer, payload: dict, path: Path) -> None:
    """Put a checkpoint back into ``trainer``: weights, optimizer state, position in the epoch, this rank's random
    streams (what ``Checkpointer.save`` wrote).

    The optimizer's and schedule's hyperparameters stay those of the config (and recipe) now in force: with an
    unchanged config they equal the saved ones, and a changed ``optim.lr``, schedule or momentum takes effect.
    """
    cfg, dist_env, optimizer = trainer.cfg, trainer.dist_env, trainer.optimizer
    sharded = path.is_dir()
    check_model_fits(trainer.model, saved_shapes(path) if sharded else shapes(payload["model"]), path)
    now = [{key: value for key, value in group.items() if key not in ("params", "lr", "initial_lr")}
           for group in optimizer.param_groups]
    base_lrs = list(trainer.scheduler.base_lrs)
    try:
        if sharded:
            load_shards(trainer.model, optimizer, path)
        else:
            trainer.model.load_state_dict(payload["model"])
            optimizer.load_state_dict(_copied_state(payload["optimizer"]))
    except (ValueError, KeyError, ShardsFailed) as error:
        raise UserError(f"checkpoint {path}: the optimizer state does not fit optim.name={cfg.optim.name} "
                        f"and the recipe's param_groups ({_first_line(error)})") from None
    for group, hyperparameters in zip(optimizer.param_groups, now):
        group.update(hyperparameters)
    trainer.scheduler.load_state_dict({**payload["scheduler"], "base_lrs": base_lrs})
    if trainer.precision.scaler and payload.get("scaler"):
        trainer.precision.scaler.load_state_dict(payload["scaler"])
    saved_ckpt = payload["config"]["ckpt"]
    same_best = (saved_ckpt["best_metric"], saved_ckpt["best_mode"]) == (cfg.ckpt.best_metric, cfg.ckpt.best_mode)
    trainer.position = Position(epoch=payload["epoch"],
                                step_in_epoch=payload["samples_in_epoch"] // cfg.train.batch_size,
                                global_step=payload["global_step"],
                                best=payload["best"] if same_best else None,  # else judged afresh, by another metric
                                saved_step=payload["global_step"])
    if payload["world_size"] == dist_env.world_size:
        rank_state = payload["rank_states"][dist_env.rank]
        restore_rng(rank_state["rng"], trainer.device)
        trainer.loss_sum.fill_(rank_state["loss_sum"])
        return
    # The epoch's loss is the ranks' summed step losses over (steps x ranks): the steps before the checkpoint
    # count as their mean over the old ranks, which every new rank carries, so the new world's sum holds it once.
    saved_ranks = payload["rank_states"]
    trainer.loss_sum.fill_(sum(state["loss_sum"] for state in saved_ranks) / len(saved_ranks))
    if dist_env.is_main:
        log.warning("resuming on %d processes from a checkpoint of %d: the data order continues exactly, the "
                    "per-rank random streams start afresh", dist_env.world_size, payload["world_size"])


def _copied_state(optimizer_state: dict) -> dict:
    """The optimizer's state with its tensors copied out of the memory-mapped checkpoint. The optimizer keeps
    them and writes them at the next step: a mapped page is then copied on its first write, one 4 KB fault at a
    time (0.55 s for 384 MB of SGD momentum here), where one copy of each tensor costs a fifth of that."""
    state = {key: {name: value.clone() if isinstance(value, torch.Tensor) else value for name, value in entry.items()}
             for key, entry in optimizer_state["state"].items()}
    return {**optimizer_state, "state": state}


def checkpoint_to_evaluate(cfg, run_dir: Path, dist_env: DistEnv) -> tuple[Path, dict | None]:
    """``eval.only``: the named file, else the newest good checkpoint in run.dir, else its model.pt; and on rank 0
    its payload when already loaded."""
    loaded: dict = {}

    def decide() -> str:
        if cfg.ckpt.resume not in ("auto", "never"):
            return cfg.ckpt.resume
        found = newest_good(run_dir / "checkpoints", None)
        if found:
            loaded["payload"] = found[1]
            return str(found[0])
        if (run_dir / "model.pt").is_file():
            return str(run_dir / "model.pt")
        raise UserError(f"eval.only=true found no checkpoint or model.pt in run.dir={run_dir}: pass "
                        "ckpt.resume=<checkpoint or model.pt>")

    return Path(on_main(dist_env, decide)), loaded.get("payload")


def restore_rng(state: dict, device: torch.device) -> None:
    """Put back what ``capture_rng`` took."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state({
        "bit_generator": "MT19937",
        "state": {"key": numpy_state["key"].numpy().astype(np.uint32), "pos": numpy_state["pos"]},
        "has_gauss": numpy_state["has_gauss"],
        "gauss": numpy_state["gauss"],
    })
