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
from torch.nn.parallel import DistributedDataParallel

from launcher.agree import on_main, run_agreed
from launcher.checkpoint import Checkpointer, save_model
from launcher.config import with_run_dir
from launcher.data import build_train_loader, steps_per_epoch
from launcher.dist_env import DistEnv, destroy_process_group, device_for, init_process_group, resolve_backend
from launcher.errors import PeerFailed, UserError
from launcher.eval_only import evaluate_checkpoint
from launcher.metrics import MetricsFile
from launcher.optim import build_optimizer
from launcher.precision import Precision
from launcher.recipe import Recipe
from launcher.resume import Start, load_named, plan_start, restore
from launcher.run_dir import Ledger, run_dir_for
from launcher.run_lock import RunLock
from launcher.schedule import build_scheduler
from launcher.stop import GracefulStop, StopRequested, StopSignals
from launcher.summary import model_summary, parameter_counts, parameter_table
from launcher.host_memory import keep_freed_memory
from launcher.tracking import WandbRun, begin_wandb, spawn_wandb
from launcher.train import TrainState, fit

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run_worker(cfg, recipe: Recipe, dist_env: DistEnv, signals: StopSignals) -> None:
    """Train ``recipe`` as this process's part of the job described by ``dist_env``."""
    device = device_for(dist_env, cfg.dist.backend)
    job_store = init_process_group(dist_env, cfg.dist.backend, device, cfg.dist.timeout_s)
    signals.job_store = job_store
    try:
        _train(cfg, recipe, dist_env, device, signals)
    except BaseException as error:
        if job_store and not isinstance(error, StopRequested):
            job_store.report_failure(f"rank {dist_env.rank}")  # the others stop at once when torchrun ends them
        waited = _waited_for_another_rank(error, cfg, job_store)
        if waited:
            raise waited from None
        raise
    finally:
        destroy_process_group(dist_env)


def _waited_for_another_rank(error: BaseException, cfg, job_store) -> PeerFailed | None:
    """The one line to say when a collective failed because of another rank (it timed out, or the rank's process
    ended), else None. torch raises gloo's failures as plain RuntimeErrors: only their text tells them apart."""
    if not isinstance(error, RuntimeError):
        return None
    text = str(error)
    failed = (job_store.failure() if job_store else None) or "another rank"
    failed = "another rank" if failed == f"rank {dist.get_rank()}" else failed  # this rank said it first
    if isinstance(error, dist.DistBackendError) and "timeout" in text.lower() or "Timed out" in text:
        return PeerFailed(
            f"a collective operation did not finish within dist.timeout_s={cfg.dist.timeout_s} s: {failed} is "
            f"stuck or has died (see its output); the backend said: {text.splitlines()[0]}")
    if any(sign in text for sign in ("Connection closed by peer", "Connection reset by peer", "Broken pipe")):
        return PeerFailed(f"stopped: {failed} ended while this rank waited for it (its error, if it had one, "
                             "is above)")
    return None


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


def _write_summary(model, train_set, device: torch.device, run_dir: Path) -> str:
    """torchsummary's table (or, where it cannot run the model, a table of the parameters), logged and saved as
    summary.txt."""
    sample = train_set[0][0]
    if isinstance(sample, torch.Tensor):
        text, problem = model_summary(model, sample, device)
    else:
        text, problem = None, f"the training set's inputs are {type(sample).__name__}, not tensors"
    if text is None:
        log.warning("torchsummary cannot run this model (%s): summary.txt lists its parameters instead", problem)
        text = parameter_table(model)
    log.info("%s", text.rstrip())
    (run_dir / "summary.txt").write_text(text)
    return text


@dataclass
class Training:
    """A run ready to train: the state, where it is recorded, and (rank 0) who records it and holds the lock."""

    cfg: object  # with run.dir filled in
    run_dir: Path
    state: TrainState
    checkpointer: Checkpointer
    metrics: MetricsFile | None
    wandb_run: WandbRun | None
    lock: RunLock | None
    attempt: int = 0  # this attempt's number in the run's history (rank 0)

    def close(self, outcome: str, detail: str = "") -> None:
        """Record how the attempt ended, let wandb finish, and give the run directory back (rank 0's work)."""
        if self.wandb_run:
            self.wandb_run.finish()
        if self.lock:
            Ledger(self.run_dir).end_attempt(self.attempt, outcome, self.state.global_step, detail)
            self.lock.release()


def build_training(cfg, recipe: Recipe, dist_env: DistEnv, device: torch.device) -> Training | None:
    """Everything a run needs, built on every rank and resumed if a checkpoint says so; None when there is nothing
    to train (``eval.only``, evaluated here, or a run already complete).

    Rank 0 holds the run directory's lock from the start, and writes nothing into it until every check passed: a
    start that fails on its config, recipe, data or checkpoint leaves no trace (not even the directory, if it made
    it), and no wandb run.
    """
    if cfg.train.keep_host_memory:
        keep_freed_memory()  # before anything is built: every allocation after it is served this way
    run_dir = run_dir_for(cfg, recipe)
    cfg = with_run_dir(cfg, str(run_dir))
    if cfg.eval.only:
        model, _, eval_set = _build_model_and_data(cfg, recipe, dist_env, device)
        evaluate_checkpoint(cfg, model, eval_set, recipe, run_dir, dist_env, device)
        return None
    lock = RunLock(run_dir, dist_env.job_id) if dist_env.is_main else None
    on_main(dist_env, lock.acquire if lock else None)
    # wandb takes about a second to import, in its own process: while the model and data are built.
    wandb_run = spawn_wandb(cfg) if dist_env.is_main else None
    try:
        return _build(cfg, recipe, dist_env, device, run_dir, lock, wandb_run)
    except BaseException:
        if wandb_run:
            wandb_run.finish()
        if lock:
            lock.release(keep_dirs=Ledger(run_dir).holds_run())
        raise


def _build_model_and_data(cfg, recipe: Recipe, dist_env: DistEnv, device: torch.device):
    seed_everything(cfg.train.seed)  # the same on every rank: identical initial weights and datasets
    model = run_agreed(dist_env, lambda: recipe.build_model(cfg)).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_set, eval_set = _build_datasets(cfg, recipe, dist_env)
    return model, train_set, eval_set


def _check_eval_set(cfg, eval_set) -> None:
    if eval_set is not None and len(eval_set) == 0:
        raise UserError("the recipe's eval set is empty: give it samples, or return None as the eval set for no "
                        "evaluation", same_on_all_ranks=True)
    if eval_set is None and cfg.ckpt.best_metric:
        raise UserError(f"ckpt.best_metric={cfg.ckpt.best_metric} needs an evaluation, but the recipe's "
                        "build_datasets returns no eval set: set ckpt.best_metric=''", same_on_all_ranks=True)


def _build(cfg, recipe: Recipe, dist_env: DistEnv, device: torch.device, run_dir: Path, lock: RunLock | None,
           wandb_run: WandbRun | None) -> Training | None:
    start, payload = plan_start(cfg, run_dir, dist_env)
    if start.complete:
        if dist_env.is_main:
            _report_complete(start, payload, run_dir)
            lock.release()
        return None
    model, train_set, eval_set = _build_model_and_data(cfg, recipe, dist_env, device)
    _check_eval_set(cfg, eval_set)
    train_loader = run_agreed(dist_env, lambda: build_train_loader(train_set, cfg, dist_env, device))
    optimizer = run_agreed(dist_env, lambda: build_optimizer(model, recipe.param_groups(model, cfg), cfg))
    seed_everything(cfg.train.seed + dist_env.rank)  # different dropout and augmentation per rank
    progress = dist_env.is_main and sys.stdout.isatty() and log.isEnabledFor(logging.INFO)
    scheduler = build_scheduler(optimizer, cfg, _total_steps(cfg, train_loader))
    precision = Precision(cfg.train.amp, cfg.train.channels_last, device)
    state = TrainState(model, model, optimizer, scheduler, precision, recipe.loss, recipe.predictions, train_loader,
                       eval_set, device, progress=progress)
    checkpointer = Checkpointer(run_dir, cfg, dist_env, start.run_id, lock)
    if start.checkpoint:  # before DDP, which broadcasts rank 0's weights
        path = Path(start.checkpoint)
        loaded = run_agreed(dist_env, lambda: payload or load_named(path))
        run_agreed(dist_env, lambda: restore(state, loaded, path, cfg, dist_env))
        checkpointer.last_good = path
    metrics, attempt = None, 0
    if dist_env.is_main:
        _log_header(cfg, recipe, dist_env, device, model, run_dir)
        if start.checkpoint:
            log.info("resumed from %s: epoch %d, step %d of it, global step %d", start.checkpoint, state.epoch,
                     state.step_in_epoch, state.global_step)
            for line in start.describe_changes():
                log.info("%s", line)
        metrics, attempt = _record_start(cfg, dist_env, start, run_dir, wandb_run)
        summary = _write_summary(model, train_set, device, run_dir)
        if wandb_run:
            wandb_run.save_summary(*parameter_counts(model), summary)
    state.ddp_model = wrap_model(model, cfg, dist_env, device)
    # What setup built (modules, configs, datasets) lives all run: out of the collector's sight, a full
    # collection no longer walks it, so it pauses the loop for far less.
    gc.freeze()
    return Training(cfg, run_dir, state, checkpointer, metrics, wandb_run, lock, attempt)


def _record_start(cfg, dist_env: DistEnv, start: Start, run_dir: Path,
                  wandb_run: WandbRun | None) -> tuple[MetricsFile, int]:
    """Rank 0, once every check passed: the ledger, config.yaml, the metrics file and wandb."""
    ledger = Ledger(run_dir)
    if start.new_run:
        ledger.create(start.run_id, cfg, start.started_from)
    resumed_from = {"checkpoint": start.checkpoint, "step": start.step} if start.checkpoint else None
    changes = {key: list(values) for key, values in start.changes.items()}
    attempt = ledger.start_attempt(cfg, dist_env.job_id, dist_env.world_size, resumed_from, changes)
    metrics = MetricsFile(run_dir / "metrics.jsonl")
    logged_through = metrics.last_step()  # by an earlier attempt: wandb has those steps already
    metrics.drop_after(start.step)
    if wandb_run:
        begin_wandb(wandb_run, cfg, run_dir, dist_env.job_group, logged_through)
        metrics.wandb = wandb_run
    return metrics, attempt


def _report_complete(start: Start, payload: dict, run_dir: Path) -> None:
    """Rank 0: a run already trained as far as its config asks says so (and writes model.pt if it was lost)."""
    model_file = run_dir / "model.pt"
    if not model_file.is_file():
        save_model(payload["model"], model_file)
    log.info("run.dir %s is complete: %d steps, %d epochs (checkpoint %s); model: %s. To train longer raise "
             "train.epochs; for a new run set run.name=<new name>", run_dir, start.step, payload["epoch"] - 1,
             start.checkpoint, model_file)


def _train(cfg, recipe: Recipe, dist_env: DistEnv, device: torch.device, signals: StopSignals) -> None:
    training = build_training(cfg, recipe, dist_env, device)
    if training is None:
        return
    cfg, state = training.cfg, training.state
    stop = GracefulStop(dist_env, signals, cfg.dist.stop_check_every)
    start = time.perf_counter()
    outcome, detail = "failed", ""
    try:
        final = fit(state, cfg, dist_env, training.metrics, training.checkpointer, stop)
        if dist_env.is_main:
            save_model(state.model.state_dict(), training.run_dir / "model.pt")
        outcome = "finished"
    except StopRequested as stopped:
        outcome, detail = "stopped", str(stopped)
        raise
    except BaseException as error:
        detail = f"{type(error).__name__}: {error}".splitlines()[0]
        raise
    finally:
        stop.close()
        training.close(outcome, detail)
    if dist_env.is_main:
        results = " | ".join(f"{key} {value:.4f}" for key, value in final.items() if key.startswith("eval/"))
        log.info("done: %d steps in %.1f s%s | model: %s", state.global_step, time.perf_counter() - start,
                 f" | {results}" if results else "", training.run_dir / "model.pt")
    if dist_env.is_distributed:
        # Leave together: a rank tearing down its connections while rank 0 still evaluates can abort in gloo.
        dist.barrier()
