"""One training process: join the group, build what the recipe describes, train, evaluate, save."""

from __future__ import annotations

import gc
import logging
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel

from launcher.agree import run_agreed
from launcher.checkpoint import Checkpointer, save_atomic
from launcher.config import with_run_dir
from launcher.data import build_train_loader, steps_per_epoch
from launcher.dist_env import DistEnv, destroy_process_group, device_for, init_process_group, resolve_backend
from launcher.errors import LauncherError
from launcher.eval_only import evaluate_checkpoint
from launcher.metrics import MetricsFile
from launcher.optim import build_optimizer
from launcher.precision import Precision
from launcher.recipe import Recipe
from launcher.resume import choose_checkpoint, load_for_resume, restore
from launcher.run_dir import choose_run_dir
from launcher.schedule import build_scheduler
from launcher.stop import GracefulStop
from launcher.summary import model_summary, parameter_counts
from launcher.host_memory import keep_freed_memory
from launcher.tracking import WandbRun, start_wandb
from launcher.train import TrainState, fit

log = logging.getLogger(__name__)


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
        if _is_collective_timeout(error):
            raise LauncherError(
                f"a collective operation did not finish within dist.timeout_s="
                f"{cfg.dist.timeout_s} s, so another rank is stuck or has died (see its output); "
                f"the backend said: {str(error).splitlines()[0]}"
            ) from None
        raise
    finally:
        destroy_process_group(dist_env)


def _is_collective_timeout(error: RuntimeError) -> bool:
    text = str(error).lower()
    return ("gloo" in text or "nccl" in text) and ("timed out" in text or "timeout" in text)


def _build_datasets(cfg, recipe: Recipe, dist_env: DistEnv):
    build = lambda: recipe.build_datasets(cfg)  # noqa: E731
    if not cfg.data.download:
        return run_agreed(dist_env, build)
    # Local rank 0 goes first, so each node downloads once and the others read finished files.
    first = run_agreed(dist_env, build if dist_env.local_rank == 0 else None)
    rest = run_agreed(dist_env, build if dist_env.local_rank != 0 else None)
    return first or rest


def wrap_model(model, cfg, dist_env: DistEnv, device: torch.device):
    """What trains: the model, compiled if asked, inside DistributedDataParallel when there are several processes.

    torch.compile goes inside DDP: DDP's forward then runs eagerly and marks itself active, so TorchDynamo's
    DDPOptimizer splits the compiled graph at DDP's bucket boundaries and each bucket's all-reduce starts while
    the rest of the backward pass runs. Compiling the DDP wrapper instead (the order PyTorch's DDP notes show)
    left the model eager with torch 2.14: Dynamo breaks the graph at DDP's ``_inside_ddp_forward`` and runs what
    is inside it uncompiled. tests/test_compile.py profiles the overlap.
    """
    compiled = torch.compile(model) if cfg.train.compile else model  # shares the parameters with ``model``
    if not dist_env.is_distributed:
        return compiled
    return DistributedDataParallel(compiled, device_ids=[device.index] if device.type == "cuda" else None,
                                   bucket_cap_mb=cfg.dist.bucket_cap_mb)


def _total_steps(cfg, train_loader) -> int:
    """Optimizer steps the whole run takes: what the LR schedule spans."""
    total = steps_per_epoch(train_loader, cfg.train.batch_size) * cfg.train.epochs
    return min(total, cfg.train.max_steps) if cfg.train.max_steps else total


def _log_header(cfg, recipe: Recipe, dist_env: DistEnv, device: torch.device, model, run_dir: Path) -> None:
    total, trainable = parameter_counts(model)
    devices = f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else device.type
    per_rank, accum = cfg.train.batch_size // dist_env.world_size, cfg.train.grad_accum
    split = f"{per_rank} per rank" if accum == 1 else f"{per_rank // accum} per rank x {accum} accumulated"
    log.info(
        "launcher: recipe %s | %d process(es), backend %s, device %s | batch %d global, %s | "
        "%s parameters (%s trainable) | run dir %s",
        recipe.name, dist_env.world_size, resolve_backend(cfg.dist.backend) if dist_env.is_distributed else "none",
        devices, cfg.train.batch_size, split, f"{total:,}", f"{trainable:,}", run_dir,
    )


def _write_summary(model, train_set, device: torch.device, run_dir: Path) -> str | None:
    """torchsummary's table, logged and saved as summary.txt; None when there is none."""
    sample = train_set[0][0]
    if not isinstance(sample, torch.Tensor):
        log.warning("model summary skipped: the training set's inputs are %s, not tensors", type(sample).__name__)
        return None
    text = model_summary(model, sample, device)
    if text:
        log.info("%s", text.rstrip())
        (run_dir / "summary.txt").write_text(text)
    return text


def _resume(state: TrainState, cfg, checkpointer: Checkpointer, dist_env: DistEnv, metrics: MetricsFile | None):
    """Continue from the checkpoint ``ckpt.resume`` names, if any."""
    path, payload = choose_checkpoint(cfg, checkpointer, dist_env)
    if path is None:
        return
    loaded = run_agreed(dist_env, lambda: payload or load_for_resume(path))
    run_agreed(dist_env, lambda: restore(state, loaded, path, cfg, dist_env))
    if dist_env.is_main:
        metrics.drop_after(state.global_step)
        log.info("resumed from %s: epoch %d, step %d of it, global step %d", path, state.epoch,
                 state.step_in_epoch, state.global_step)


def _start_wandb(cfg, run_dir: Path, dist_env: DistEnv, metrics: MetricsFile) -> WandbRun | None:
    """Rank 0: the job's wandb run, the same one across restarts (its id is kept in run.dir); starts in its own
    process."""
    id_file = run_dir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.exists() else None
    wandb_run = start_wandb(cfg, run_dir, dist_env.job_group, run_id, logged_through=metrics.last_step())
    if wandb_run is not None:
        id_file.write_text(wandb_run.id)
        metrics.wandb = wandb_run
    return wandb_run


@dataclass
class Training:
    """A run ready to train: the state and what records it (rank 0 alone holds ``metrics`` and ``wandb_run``)."""

    cfg: object  # with run.dir filled in
    run_dir: Path
    state: TrainState
    checkpointer: Checkpointer
    metrics: MetricsFile | None
    wandb_run: WandbRun | None


def build_training(cfg, recipe: Recipe, dist_env: DistEnv, device: torch.device) -> Training | None:
    """Everything a run needs, built on every rank and resumed if a checkpoint says so; None for ``eval.only``
    (evaluated here instead)."""
    if cfg.train.keep_host_memory:
        keep_freed_memory()  # before anything is built: every allocation after it is served this way
    run_dir = choose_run_dir(cfg, recipe, dist_env)
    cfg = with_run_dir(cfg, str(run_dir))
    metrics, wandb_run = None, None
    if dist_env.is_main and not cfg.eval.only:
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics = MetricsFile(run_dir / "metrics.jsonl")
        # wandb takes about a second to import and start, in its own process: while the model and data are built.
        wandb_run = _start_wandb(cfg, run_dir, dist_env, metrics)
    return _build(cfg, recipe, dist_env, device, run_dir, metrics, wandb_run)


def _build(cfg, recipe: Recipe, dist_env: DistEnv, device: torch.device, run_dir: Path, metrics: MetricsFile | None,
           wandb_run: WandbRun | None) -> Training | None:
    seed_everything(cfg.train.seed)  # the same on every rank: identical initial weights and datasets
    model = run_agreed(dist_env, lambda: recipe.build_model(cfg)).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_set, eval_set = _build_datasets(cfg, recipe, dist_env)
    checkpointer = Checkpointer(run_dir, cfg, dist_env)
    if cfg.eval.only:
        evaluate_checkpoint(cfg, model, eval_set, recipe, checkpointer, dist_env, device)
        return None
    train_loader = run_agreed(dist_env, lambda: build_train_loader(train_set, cfg, dist_env, device))
    optimizer = run_agreed(dist_env, lambda: build_optimizer(model, recipe.param_groups(model, cfg), cfg))
    if dist_env.is_main:
        OmegaConf.save(cfg, run_dir / "config.yaml")
        _log_header(cfg, recipe, dist_env, device, model, run_dir)
        summary = _write_summary(model, train_set, device, run_dir)
        if wandb_run:
            wandb_run.save_summary(*parameter_counts(model), summary)
    seed_everything(cfg.train.seed + dist_env.rank)  # different dropout and augmentation per rank
    progress = dist_env.is_main and sys.stdout.isatty() and log.isEnabledFor(logging.INFO)
    scheduler = build_scheduler(optimizer, cfg, _total_steps(cfg, train_loader))
    precision = Precision(cfg.train.amp, cfg.train.channels_last, device)
    state = TrainState(model, model, optimizer, scheduler, precision, recipe.loss, recipe.predictions, train_loader,
                       eval_set, device, progress=progress)
    _resume(state, cfg, checkpointer, dist_env, metrics)  # before DDP, which broadcasts rank 0's weights
    state.ddp_model = wrap_model(model, cfg, dist_env, device)
    # What setup built (modules, configs, datasets) lives all run: out of the collector's sight, a full
    # collection no longer walks it, so it pauses the loop for far less.
    gc.freeze()
    return Training(cfg, run_dir, state, checkpointer, metrics, wandb_run)


def _train(cfg, recipe: Recipe, dist_env: DistEnv, device: torch.device) -> None:
    training = build_training(cfg, recipe, dist_env, device)
    if training is None:
        return
    cfg, state = training.cfg, training.state
    stop = GracefulStop(dist_env, cfg.dist.stop_check_every)
    start = time.perf_counter()
    try:
        final = fit(state, cfg, dist_env, training.metrics, training.checkpointer, stop)
    finally:
        stop.close()
        if training.wandb_run:
            training.wandb_run.finish()
    if dist_env.is_main:
        save_atomic(state.model.state_dict(), training.run_dir / "model.pt")
        results = " | ".join(f"{key} {value:.4f}" for key, value in final.items() if key.startswith("eval/"))
        log.info("done: %d steps in %.1f s%s | model: %s", state.global_step, time.perf_counter() - start,
                 f" | {results}" if results else "", training.run_dir / "model.pt")
    if dist_env.is_distributed:
        # Leave together: a rank tearing down its connections while rank 0 still evaluates can abort in gloo.
        dist.barrier()
