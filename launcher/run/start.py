"""How an attempt starts: a new run, or run.dir's run continued from a checkpoint (``ckpt.resume``).

Every config change since that checkpoint is either allowed, applied, or refused before anything is written.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from launcher.checkpoint.formats import (
    is_checkpoint,
    load_named,
    missing_parts,
    newest_good,
    run_id_of,
    step_files,
    step_of,
)
from launcher.config.keys import APPLIED, DEFAULTS, FREE, KEYS, leaves, resume_policy
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

    def describe_changes(self, streamed: bool = False) -> list[str]:
        """One line per changed key, saying what happens to it.

        ``streamed``: the training set is a stream, whose own line says what a change of its parts does (a key's
        ``on_change`` speaks of map-style data).
        """
        def consequence(key: str) -> str:
            said = KEYS[key].on_change if key in KEYS else ""
            return f": {said}" if said and not (streamed and key in _SPLITTING_KEYS) else ""

        return [f"changed since the checkpoint: {key} {old} -> {new}"
                + (", applied to the restored optimizer and schedule" if resume_policy(key) == APPLIED else "")
                + consequence(key) for key, (old, new) in self.changes.items()]


_SPLITTING_KEYS = ("data.num_workers", "dist.nproc_per_node")  # they split the data over other parts


def config_changes(saved: dict, cfg) -> dict[str, tuple]:
    """Keys whose value differs between a checkpoint's config and ``cfg``.

    A key the checkpoint lacks (added to the engine since) counts as unchanged while it holds the engine's default;
    recipes compare by name.
    """
    old, new = dict(leaves(saved)), dict(leaves(OmegaConf.to_container(cfg)))
    old["recipe"], new["recipe"] = recipe_name(str(old.get("recipe", ""))), recipe_name(cfg.recipe)
    changes = {}
    for key in sorted(old.keys() | new.keys()):
        before, after = old.get(key, DEFAULTS.get(key, _MISSING)), new.get(key, _MISSING)
        if before != after:
            changes[key] = (before, after)
    return changes


def fixed_keys(changes: dict) -> list[str]:
    """The changed keys that define the run: a run with any of them changed is another run."""
    return [key for key in changes if resume_policy(key) not in (FREE, APPLIED)]


def _refuse_changes(changes: dict, saved: dict, run_dir: Path) -> None:
    fixed = fixed_keys(changes)
    if "train.batch_size" in changes and saved["samples_in_epoch"]:
        fixed.append("train.batch_size")  # mid-epoch: the position is a number of whole batches of the old size
    if fixed:
        listed = ", ".join(f"{key} {changes[key][0]} -> {changes[key][1]}" for key in fixed)
        where = " (mid-epoch, where the position counts batches of the old size)" if "train.batch_size" in fixed else ""
        raise UserError(
            f"run.dir={run_dir} cannot continue with these keys changed since its checkpoint: {listed}{where}. "
            "They define the run: set them back to continue it, or start another run (run.name=<new name>, or "
            "another run.dir)"
        )


def _complete(saved: dict, cfg) -> bool:
    return saved["epoch"] > cfg.train.epochs or bool(cfg.train.max_steps and
                                                        saved["global_step"] >= cfg.train.max_steps)


def plan_start(cfg, run_dir: Path, dist_env: DistEnv) -> tuple[Start, dict | None]:
    """Collective: how this attempt starts (the same ``Start`` on every rank).

    On rank 0, also the checkpoint it continues from, already loaded and verified. Every refusal comes before anything
    is written.
    """
    loaded: dict = {}

    def decide() -> Start:
        start, saved = _decide(cfg, run_dir)
        loaded["saved"] = saved
        return start

    return on_main(dist_env, decide), loaded.get("saved")


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
        path, saved = found
        run_id, started_from = held or saved.get("run_id") or new_run_id(), None
    else:
        path = Path(cfg.ckpt.resume)
        saved = load_named(path)
        if not is_checkpoint(saved):
            raise UserError(f"ckpt.resume={path} is a model state_dict, not a checkpoint: evaluate it with "
                            "eval.only=true, or load it in the recipe's build_model to start from its weights")
        if missing_parts(saved):
            raise UserError(f"ckpt.resume={path} is not a complete training checkpoint (it lacks "
                            f"{', '.join(missing_parts(saved))}): name a step_<N> checkpoint a run wrote")
        run_id, started_from = _continue_named(path, saved, ledger, folder)
    changes = config_changes(saved["config"], cfg)
    _refuse_changes(changes, saved, run_dir)
    start = Start(run_id, new_run=held is None, checkpoint=str(path), step=saved["global_step"],
                  started_from=started_from, changes=changes, complete=_complete(saved, cfg))
    return start, saved


def _continue_named(path: Path, saved: dict, ledger: Ledger, folder: Path) -> tuple[str, str | None]:
    """The run id a start from the named checkpoint ``path`` trains under.

    Also the checkpoint of another run it starts from (None when it continues its own). Refused where training on would
    mix two runs' checkpoints or overwrite newer ones.
    """
    held, theirs = ledger.run_id(), saved.get("run_id")
    inside = path.resolve().parent == folder.resolve()
    if held is None:
        return (theirs or new_run_id(), None) if inside else (new_run_id(), str(path))
    if theirs and theirs != held:
        raise UserError(f"ckpt.resume={path} is a checkpoint of run {theirs}, but run.dir={ledger.run_dir} holds run "
                        f"{held}: continue from it in a new directory (run.name=<new name>, or another run.dir)")
    newest = max((step_of(p) for p in step_files(folder) if run_id_of(p) in (held, "")),
                 default=0)
    if saved["global_step"] < newest:
        raise UserError(
            f"ckpt.resume={path} is at step {saved['global_step']}, older than this run's newest checkpoint "
            f"(step {newest}): training on from it would overwrite the checkpoints after it. Continue from it in a "
            "new directory (run.name=<new name>, or another run.dir)"
        )
    return held, None
