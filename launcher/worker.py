"""One training process: join the group, build what the recipe describes, train, evaluate, save."""

from __future__ import annotations

import logging
import random
import secrets
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel

from launcher.checkpoint import Checkpointer, check_model_fits, save_atomic
from launcher.config import with_run_dir
from launcher.data import build_train_loader
from launcher.dist_env import DistEnv, destroy_process_group, device_for, init_process_group, resolve_backend
from launcher.errors import LauncherError, UserError
from launcher.metrics import MetricsFile
from launcher.optim import build_optimizer
from launcher.evaluate import evaluate
from launcher.recipe import Recipe
from launcher.resume import choose_checkpoint, is_checkpoint, load_for_resume, restore
from launcher.stop import GracefulStop
from launcher.summary import model_summary, parameter_counts
from launcher.train import TrainState, fit

log = logging.getLogger(__name__)


def new_run_id() -> str:
    """A fresh run id: readable, sortable, and unlikely to collide."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run_worker(cfg, recipe: Recipe, dist_env: DistEnv) -> None:
    """Train ``recipe`` as this process's part of the job described by ``dist_env``."""
    device = device_for(dist_env, cfg.dist.backend)
    init_process_group(dist_env, cfg.dist.backend, device, cfg.dist.timeout_s)
    try:
        _train(cfg, recipe, dist_env, device)
    except RuntimeError as error:
        if "timed out" in str(error).lower() or "timeout" in str(error).lower():
            raise LauncherError(
                f"a collective operation did not finish within dist.timeout_s="
                f"{cfg.dist.timeout_s} s, so another rank is stuck or has died (see its output); "
                f"the backend said: {str(error).splitlines()[0]}"
            ) from None
        raise
    finally:
        destroy_process_group(dist_env)


def run_agreed(dist_env: DistEnv, build: Callable | None):
    """Run ``build`` (None: nothing) on this rank; if a UserError happens on any rank, every rank raises it.

    So a bad data path fails the job once, with one message from rank 0, instead of once per process or with
    the healthy ranks waiting forever in their next collective.
    """
    result, error = None, None
    try:
        result = build() if build else None
    except UserError as caught:
        error = str(caught)
    errors = [error]
    if dist_env.is_distributed:
        errors = [None] * dist_env.world_size
        dist.all_gather_object(errors, error)
    failures = [(rank, message) for rank, message in enumerate(errors) if message]
    if failures:
        rank, message = failures[0]
        where = f"rank {rank}: " if dist_env.is_distributed and len(failures) < dist_env.world_size else ""
        raise UserError(where + message, same_on_all_ranks=True)
    return result


def choose_run_dir(cfg, recipe: Recipe, dist_env: DistEnv) -> Path:
    """``run.dir`` if set, else runs/<recipe>/<job id>; rank 0 picks a new id when nothing names the job."""
    if cfg.run.dir:
        return Path(cfg.run.dir)
    run_id = [dist_env.job_id or new_run_id()]
    if dist_env.is_distributed and dist_env.job_id is None:
        dist.broadcast_object_list(run_id, src=0)
    return Path("runs") / recipe.name / run_id[0]


def _build_datasets(cfg, recipe: Recipe, dist_env: DistEnv):
    build = lambda: recipe.build_datasets(cfg)  # noqa: E731
    if not cfg.data.download:
        return run_agreed(dist_env, build)
    # Local rank 0 goes first, so each node downloads once and the others read finished files.
    first = run_agreed(dist_env, build if dist_env.local_rank == 0 else None)
    rest = run_agreed(dist_env, build if dist_env.local_rank != 0 else None)
    return first or rest


def _log_header(cfg, recipe: Recipe, dist_env: DistEnv, device: torch.device, model, run_dir: Path) -> None:
    total, trainable = parameter_counts(model)
    per_rank = cfg.train.batch_size // dist_env.world_size
    log.info(
        "launcher: recipe %s | %d process(es), backend %s, device %s | batch %d global, %d per rank | "
        "%s parameters (%s trainable) | run dir %s",
        recipe.name, dist_env.world_size, resolve_backend(cfg.dist.backend) if dist_env.is_distributed else "none",
        device.type, cfg.train.batch_size, per_rank, f"{total:,}", f"{trainable:,}", run_dir,
    )


def _write_summary(model, train_set, device: torch.device, run_dir: Path) -> None:
    sample = train_set[0][0]
    if not isinstance(sample, torch.Tensor):
        log.warning("model summary skipped: the training set's inputs are %s, not tensors", type(sample).__name__)
        return
    text = model_summary(model, sample, device)
    if text:
        log.info("%s", text.rstrip())
        (run_dir / "summary.txt").write_text(text)


def _evaluate_only(cfg, model, eval_set, loss_fn, checkpointer: Checkpointer, dist_env: DistEnv, device) -> None:
    """``eval.only=true``: evaluate a checkpoint or model.pt (``ckpt.resume``) and print the metrics."""
    path, payload = choose_checkpoint(cfg, checkpointer, dist_env, allow_model=True)
    if path is None:
        raise UserError(f"eval.only=true found no checkpoint or model.pt in run.dir={checkpointer.folder.parent}: "
                        "pass ckpt.resume=<checkpoint or model.pt>", same_on_all_ranks=True)
    if eval_set is None:
        raise UserError("eval.only=true, but the recipe's build_datasets returns no eval set", same_on_all_ranks=True)

    def load_weights():
        loaded = payload or load_for_resume(path)
        weights = loaded["model"] if is_checkpoint(loaded) else loaded
        check_model_fits(model, weights, path)
        model.load_state_dict(weights)

    run_agreed(dist_env, load_weights)
    if cfg.eval.sharded or dist_env.is_main:
        metrics = evaluate(model, eval_set, loss_fn, cfg, device, dist_env, sharded=cfg.eval.sharded)
    if dist_env.is_main:
        log.info("evaluated %s | %s", path, " | ".join(f"{key} {value:.4f}" for key, value in metrics.items()))


def _resume(state: TrainState, cfg, checkpointer: Checkpointer, dist_env: DistEnv, metrics: MetricsFile | None):
    path, payload = choose_checkpoint(cfg, checkpointer, dist_env)
    if path is None:
        return
    run_agreed(dist_env, lambda: restore(state, payload or load_for_resume(path), path, cfg, dist_env))
    if dist_env.is_main:
        metrics.drop_after(state.global_step)
        log.info("resumed from %s: epoch %d, step %d of it, global step %d", path, state.epoch,
                 state.step_in_epoch, state.global_step)


def _train(cfg, recipe: Recipe, dist_env: DistEnv, device: torch.device) -> None:
    run_dir = choose_run_dir(cfg, recipe, dist_env)
    cfg = with_run_dir(cfg, str(run_dir))
    seed_everything(cfg.train.seed)  # the same on every rank: identical initial weights and datasets
    model = run_agreed(dist_env, lambda: recipe.build_model(cfg)).to(device)
    train_set, eval_set = _build_datasets(cfg, recipe, dist_env)
    checkpointer = Checkpointer(run_dir, cfg, dist_env)
    if cfg.eval.only:
        _evaluate_only(cfg, model, eval_set, recipe.loss, checkpointer, dist_env, device)
        return
    train_loader = run_agreed(dist_env, lambda: build_train_loader(train_set, cfg, dist_env, device))
    optimizer = run_agreed(dist_env, lambda: build_optimizer(model, recipe.param_groups(model, cfg), cfg))
    metrics = None
    if dist_env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / "config.yaml")
        metrics = MetricsFile(run_dir / "metrics.jsonl")
        _log_header(cfg, recipe, dist_env, device, model, run_dir)
        _write_summary(model, train_set, device, run_dir)
    seed_everything(cfg.train.seed + dist_env.rank)  # different dropout and augmentation per rank
    state = TrainState(model, model, optimizer, recipe.loss, train_loader, eval_set, device)
    _resume(state, cfg, checkpointer, dist_env, metrics)  # before DDP, which then broadcasts rank 0's weights
    if dist_env.is_distributed:
        state.ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    stop = GracefulStop(dist_env)
    start = time.perf_counter()
    try:
        final = fit(state, cfg, dist_env, metrics, checkpointer, stop)
    finally:
        stop.close()
    if dist_env.is_main:
        save_atomic(model.state_dict(), run_dir / "model.pt")
        results = ", ".join(f"{key} {value:.4f}" for key, value in final.items() if key.startswith("eval/"))
        log.info(
            "done in %.1f s%s | model: %s", time.perf_counter() - start, f" | {results}" if results else "",
            run_dir / "model.pt",
        )
    if dist_env.is_distributed:
        # Leave together: a rank tearing down its connections while rank 0 still evaluates can abort in gloo.
        dist.barrier()
