"""The training loop: DDP steps, step and epoch checkpoints, graceful stops, evaluation and metrics."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from launcher.agree import on_main
from launcher.checkpoint import Checkpointer, TrainingDiverged
from launcher.data import start_epoch, steps_per_epoch
from launcher.dist_env import DistEnv
from launcher.errors import UserError
from launcher.evaluate import evaluate
from launcher.metrics import MetricsFile, format_epoch
from launcher.precision import Precision
from launcher.rng import capture_rng
from launcher.stop import GracefulStop, StopRequested

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Everything training changes, and where it stands: epoch in progress, steps of it done, steps overall."""

    ddp_model: nn.Module  # what trains (the DDP wrapper, or the model itself on one process)
    model: nn.Module  # the unwrapped model: evaluated and saved
    optimizer: torch.optim.Optimizer
    scheduler: object  # a torch LR scheduler, stepped once per optimizer step
    precision: Precision
    loss_fn: object
    predict: object  # outputs -> what accuracy scores (the recipe's predictions)
    train_loader: object
    eval_set: object
    device: torch.device
    epoch: int = 1
    step_in_epoch: int = 0
    global_step: int = 0
    best: float | None = None
    loss_sum: torch.Tensor = field(default=None)  # this rank's summed step losses in the epoch, on the device
    saved_step: int = -1  # global step of the last checkpoint
    progress: bool = False  # a progress bar (rank 0, on a terminal) instead of periodic lines

    def __post_init__(self):
        if self.loss_sum is None:
            self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)  # windows are differences of it

    def training_state(self, cfg) -> dict:
        """What rank 0 writes: the same on every rank."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.precision.scaler.state_dict() if self.precision.scaler else None,
            "epoch": self.epoch,
            "samples_in_epoch": self.step_in_epoch * cfg.train.batch_size,
            "global_step": self.global_step,
            "best": self.best,
        }

    def rank_state(self) -> dict:
        """What differs between ranks: random streams and the partial epoch loss."""
        return {"rng": capture_rng(self.device), "loss_sum": self.loss_sum.item()}


def save_checkpoint(state: TrainState, cfg, checkpointer: Checkpointer, best: bool = False):
    """Collective: every rank calls it at the same step."""
    path = checkpointer.save(state.training_state(cfg), state.rank_state(), best)
    state.saved_step = state.global_step
    return path


def reached_max_steps(state: TrainState, cfg) -> bool:
    return bool(cfg.train.max_steps) and state.global_step >= cfg.train.max_steps


def run_steps(state: TrainState, cfg, dist_env: DistEnv, metrics, checkpointer, stop: GracefulStop) -> bool:
    """Train the rest of the current epoch; True if a stop was agreed on (after writing a checkpoint)."""
    state.ddp_model.train()
    start_epoch(state.train_loader, state.epoch, state.step_in_epoch * cfg.train.batch_size)
    total = steps_per_epoch(state.train_loader, cfg.train.batch_size)
    bar = _progress_bar(state, cfg, total) if state.progress else None
    try:
        return train_steps(state, cfg, dist_env, metrics, checkpointer, stop, iter(state.train_loader), total,
                           cfg.train.max_steps, bar)
    finally:
        if bar is not None:
            bar.close()


def _micro_step(state: TrainState, inputs, targets, accum: int, sync: bool) -> None:
    """Forward and backward of one micro-batch; DDP all-reduces gradients only when ``sync`` (the last one)."""
    skip_sync = not sync and isinstance(state.ddp_model, DistributedDataParallel)
    with state.ddp_model.no_sync() if skip_sync else contextlib.nullcontext():
        with state.precision.autocast():
            loss = state.loss_fn(state.ddp_model(inputs), targets)
        state.precision.backward(loss / accum if accum > 1 else loss)  # the step's gradient: the micro-batch mean
    state.loss_sum.add_(loss.detach(), alpha=1 / accum)  # one op per micro-batch; read only when reporting


def train_steps(state: TrainState, cfg, dist_env: DistEnv, metrics, checkpointer, stop, batches, total: int,
                until_step: int, bar=None) -> bool:
    """Optimizer steps on ``batches`` (from an epoch of ``total`` steps) until they run out or the global step
    reaches ``until_step`` (0: no limit); True if a stop was agreed on (after writing a checkpoint).

    The only host syncs are rank 0's, every ``train.log_every`` steps.
    """
    # Config values read once: an OmegaConf lookup costs microseconds, and this loop runs every step.
    accum, clip, log_every = cfg.train.grad_accum, cfg.train.clip_grad_norm, cfg.train.log_every
    batch_size, save_every = cfg.train.batch_size, cfg.ckpt.every_steps
    window = _Window(state.loss_sum)
    for micro, (inputs, targets) in enumerate(batches, 1):
        inputs = state.precision.prepare(inputs.to(state.device, non_blocking=True))
        targets = targets.to(state.device, non_blocking=True)
        _micro_step(state, inputs, targets, accum, sync=micro % accum == 0)
        if micro % accum:
            continue
        if clip:
            state.precision.unscale(state.optimizer)
            window.grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), clip)
        state.precision.step(state.optimizer)
        state.optimizer.zero_grad(set_to_none=True)
        state.scheduler.step()
        state.step_in_epoch += 1
        state.global_step += 1
        window.steps += 1
        if bar is not None:
            bar.update()
        if state.global_step % log_every == 0 and dist_env.is_main:
            report = window.take(batch_size)
            _log_step(state, report, total, metrics, bar)
            if not math.isfinite(report["train/loss"]):
                stop.diverged(state.global_step)  # every rank stops at the next agreement
        if save_every and state.global_step % save_every == 0 and state.step_in_epoch < total:
            save_checkpoint(state, cfg, checkpointer)  # the epoch's last step is saved after its evaluation
        if stop.should_stop(state.global_step):
            if stop.diverged_at is not None:
                raise TrainingDiverged(checkpointer.diverged_message(stop.diverged_at), same_on_all_ranks=True)
            if state.saved_step != state.global_step:
                save_checkpoint(state, cfg, checkpointer)
            return True
        if until_step and state.global_step >= until_step:
            break
    return False


class _Window:
    """Loss and time since the last progress report; read (a host sync) only when reporting.

    The window's loss is what the epoch's running loss sum gained since the window began, so a step adds nothing
    but a count here.
    """

    def __init__(self, loss_sum: torch.Tensor):
        self.loss_sum, self.sum_before = loss_sum, loss_sum.clone()
        self.steps, self.start = 0, time.perf_counter()
        self.grad_norm: torch.Tensor | None = None  # the last step's, before clipping

    def take(self, batch_size: int) -> dict:
        """Mean loss and samples per second over the window, then start a new one."""
        now = time.perf_counter()
        report = {"train/loss": (self.loss_sum - self.sum_before).item() / self.steps,
                  "throughput/samples_per_s": self.steps * batch_size / (now - self.start)}
        if self.grad_norm is not None:
            report["grad_norm"] = self.grad_norm.item()
        self.sum_before.copy_(self.loss_sum)
        self.steps, self.start = 0, now
        return report


def _progress_bar(state: TrainState, cfg, steps_per_epoch: int):
    from tqdm import tqdm

    return tqdm(total=steps_per_epoch, initial=state.step_in_epoch, desc=f"epoch {state.epoch}/{cfg.train.epochs}",
                unit="step", leave=False, dynamic_ncols=True)


def _log_step(state: TrainState, report: dict, steps_per_epoch: int, metrics: MetricsFile, bar) -> None:
    lrs = {f"lr/group{i}": group["lr"] for i, group in enumerate(state.optimizer.param_groups)}
    metrics.write({"step": state.global_step, "epoch": state.epoch, **report, **lrs})
    loss, speed = report["train/loss"], report["throughput/samples_per_s"]
    if bar is not None:
        bar.set_postfix_str(f"loss {loss:.4f}, {speed:,.0f} samples/s")
    else:
        log.info("epoch %d step %d/%d | loss %.4f | %s samples/s", state.epoch, state.step_in_epoch, steps_per_epoch,
                 loss, f"{speed:,.0f}")


def _new_best(state: TrainState, cfg, record: dict, dist_env: DistEnv) -> float | None:
    """Rank 0 judges the new eval metric against the best so far; every rank learns the new best, or None, or
    that ``ckpt.best_metric`` names a metric evaluation does not produce."""

    def judge() -> float | None:
        if cfg.ckpt.best_metric not in record:
            produced = ", ".join(sorted(key for key in record if key.startswith("eval/")))
            raise UserError(f"ckpt.best_metric={cfg.ckpt.best_metric} is not a metric this run's evaluation "
                            f"produces ({produced}): use one of those, or '' for no best checkpoint")
        value, best = record[cfg.ckpt.best_metric], state.best
        improved = best is None or (value > best if cfg.ckpt.best_mode == "max" else value < best)
        return value if improved else None

    return on_main(dist_env, judge)


def finish_epoch(state: TrainState, cfg, dist_env: DistEnv, metrics, checkpointer, start: float, steps_run: int):
    """Average the epoch's loss over ranks, evaluate, checkpoint, and write the epoch's record."""
    loss_sum = state.loss_sum.clone()
    if dist_env.is_distributed:
        dist.all_reduce(loss_sum)
    train_loss = loss_sum.item() / (max(1, state.step_in_epoch) * dist_env.world_size)  # also waits for the device
    if not math.isfinite(train_loss):  # the same all-reduced value on every rank: all stop here
        raise TrainingDiverged(checkpointer.diverged_message(state.global_step), same_on_all_ranks=True)
    seconds = time.perf_counter() - start
    record = {
        "step": state.global_step,
        "epoch": state.epoch,
        "train/loss": train_loss,
        "time/epoch_s": seconds,
        "throughput/samples_per_s": steps_run * cfg.train.batch_size / seconds,
    }
    if state.eval_set is not None and (cfg.eval.sharded or dist_env.is_main):
        args = (state.model, state.eval_set, state.loss_fn, cfg, state.device, dist_env)
        record.update(evaluate(*args, sharded=cfg.eval.sharded, predict=state.predict))
    new_best = _new_best(state, cfg, record, dist_env) if cfg.ckpt.best_metric else None
    improved = new_best is not None
    if improved:
        state.best = new_best
    state.epoch, state.step_in_epoch = state.epoch + 1, 0
    state.loss_sum.zero_()
    every = cfg.ckpt.every_epochs
    last = record["epoch"] == cfg.train.epochs or reached_max_steps(state, cfg)
    if improved or (every and record["epoch"] % every == 0) or last:
        save_checkpoint(state, cfg, checkpointer, best=improved)
    if dist_env.is_main:
        metrics.write(record)
        log.info(format_epoch(record, cfg.train.epochs))
    return record


def fit(state: TrainState, cfg, dist_env: DistEnv, metrics, checkpointer, stop: GracefulStop) -> dict:
    """Train from where ``state`` stands to the end of ``train.epochs``; returns the last epoch's record."""
    record: dict = {}
    while state.epoch <= cfg.train.epochs and not reached_max_steps(state, cfg):
        start, first_step = time.perf_counter(), state.step_in_epoch
        if run_steps(state, cfg, dist_env, metrics, checkpointer, stop):
            raise StopRequested(
                f"stopped after step {state.global_step} ({stop.signal_name or 'a signal on another rank'}): "
                f"checkpoint written to {checkpointer.path_for(state.global_step)}; run the same command to continue",
                same_on_all_ranks=True,
            )
        record = finish_epoch(state, cfg, dist_env, metrics, checkpointer, start, state.step_in_epoch - first_step)
    return record
