"""The training loop: one epoch of DDP steps, and the epochs around it with evaluation and metrics."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from launcher.dist_env import DistEnv
from launcher.evaluate import evaluate
from launcher.metrics import MetricsFile, format_epoch

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """What the loop needs beyond the config: the model twice (DDP wrapper to train, module to evaluate)."""

    ddp_model: nn.Module
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: object
    train_loader: object
    sampler: object
    eval_set: object
    device: torch.device
    global_step: int = 0


def train_one_epoch(state: TrainState, epoch: int, cfg, dist_env: DistEnv, metrics: MetricsFile | None) -> torch.Tensor:
    """One pass over this rank's shard; returns the sum of its step losses, still on the device.

    The only host syncs are rank 0's, every ``train.log_every`` steps.
    """
    state.ddp_model.train()
    loss_sum = torch.zeros((), device=state.device)
    window = torch.zeros((), device=state.device)
    steps_per_epoch = len(state.train_loader)
    for step, (inputs, targets) in enumerate(state.train_loader, 1):
        inputs = inputs.to(state.device, non_blocking=True)
        targets = targets.to(state.device, non_blocking=True)
        loss = state.loss_fn(state.ddp_model(inputs), targets)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()
        state.global_step += 1
        loss_sum += loss.detach()
        window += loss.detach()
        if step % cfg.train.log_every == 0 and dist_env.is_main:
            record = {
                "step": state.global_step,
                "epoch": epoch,
                "train/loss": window.item() / cfg.train.log_every,
                "lr": state.optimizer.param_groups[0]["lr"],
            }
            window.zero_()
            metrics.write(record)
            log.info("epoch %d step %d/%d | loss %.4f", epoch, step, steps_per_epoch, record["train/loss"])
    return loss_sum


def fit(state: TrainState, cfg, dist_env: DistEnv, metrics: MetricsFile | None) -> dict:
    """Train ``train.epochs`` epochs, evaluating after each; returns the last epoch's record (on rank 0)."""
    record: dict = {}
    steps = len(state.train_loader)
    for epoch in range(1, cfg.train.epochs + 1):
        state.sampler.set_epoch(epoch)
        start = time.perf_counter()
        loss_sum = train_one_epoch(state, epoch, cfg, dist_env, metrics)
        if dist_env.is_distributed:
            dist.all_reduce(loss_sum)
        train_loss = loss_sum.item() / (steps * dist_env.world_size)  # also waits for the device
        seconds = time.perf_counter() - start
        record = {
            "step": state.global_step,
            "epoch": epoch,
            "train/loss": train_loss,
            "time/epoch_s": seconds,
            "throughput/samples_per_s": steps * cfg.train.batch_size / seconds,
        }
        if state.eval_set is not None and (cfg.eval.sharded or dist_env.is_main):
            args = (state.model, state.eval_set, state.loss_fn, cfg, state.device, dist_env)
            record.update(evaluate(*args, sharded=cfg.eval.sharded))
        if dist_env.is_main:
            metrics.write(record)
            log.info(format_epoch(record, cfg.train.epochs))
    return record
