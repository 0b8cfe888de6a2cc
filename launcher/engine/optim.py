"""The optimizer and its learning-rate schedule.

The optimizer is built from the recipe's parameter groups and the optim.* keys; the schedule (sched.*) is stepped once
per optimizer step, with linear warmup.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from launcher.errors import UserError


def build_optimizer(model: nn.Module, groups: list[dict], cfg) -> torch.optim.Optimizer:
    """``optim.name`` over ``groups``; each group's own options (e.g. ``lr``) override the optim.* defaults."""
    groups = _materialize(groups)
    _refuse_untrained(model, groups)
    o = cfg.optim
    # One fused kernel per step instead of a launch per parameter (or per foreach chunk), where torch has it: CUDA,
    # and for sharded (DTensor) parameters Adam and AdamW only (torch 2.14 has no sharding rule for fused SGD).
    params = [p for group in groups for p in group["params"]]
    sharded = any(hasattr(p, "to_local") for p in params)  # DTensors (FSDP's shards)
    fused = all(p.is_cuda and p.is_floating_point() for p in params) and not (sharded and o.name == "sgd") or None
    try:
        if o.name == "sgd":
            return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, fused=fused)
        if o.name == "adam":
            return torch.optim.Adam(groups, lr=o.lr, weight_decay=o.weight_decay, fused=fused)
        return torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay, fused=fused)
    except (ValueError, TypeError) as error:  # e.g. a parameter in two groups, or an option the optimizer lacks
        raise UserError(f"the recipe's param_groups do not fit optim.name={o.name}: {error}") from None


def _materialize(groups: list[dict]) -> list[dict]:
    """Groups with their ``params`` as lists: recipes often pass generators (``net.features.parameters()``)."""
    if not all(isinstance(group, dict) and "params" in group for group in groups):
        raise UserError("param_groups(model, cfg) must return a list of dicts, each with a 'params' entry")
    return [dict(group, params=list(group["params"])) for group in groups]


def _refuse_untrained(model: nn.Module, groups: list[dict]) -> None:
    """A trainable parameter in no group would silently never train: freezing is said with requires_grad."""
    grouped = {id(p) for group in groups for p in group["params"]}
    left_out = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in grouped]
    if left_out:
        listed = ", ".join(left_out[:5]) + (f" and {len(left_out) - 5} more" if len(left_out) > 5 else "")
        raise UserError(f"the recipe's param_groups leave {len(left_out)} trainable parameter(s) out of every group "
                        f"({listed}): add them to a group, or freeze them in build_model with "
                        "parameter.requires_grad_(False)")


def lr_multiplier(cfg, total_steps: int):
    """The factor on each param group's learning rate after ``step`` optimizer steps.

    ``onecycle`` is a cosine with a warmup of 30% of the steps (unless ``sched.warmup_steps`` says otherwise).
    The config values are read once, here: an OmegaConf lookup in ``multiplier`` would cost every step
    microseconds (BENCHMARKS.md).
    """
    name, gamma, step_size, min_ratio = cfg.sched.name, cfg.sched.gamma, cfg.sched.step_size, cfg.sched.min_lr_ratio
    warmup = cfg.sched.warmup_steps or (round(0.3 * total_steps) if name == "onecycle" else 0)

    def multiplier(step: int) -> float:
        ramp = min(1.0, (step + 1) / warmup) if warmup else 1.0
        if name == "step":
            return ramp * gamma ** (step // step_size)
        if name in ("cosine", "onecycle"):
            progress = min(1.0, max(0, step - warmup) / max(1, total_steps - warmup))
            return ramp * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
        return ramp

    return multiplier


class StepSchedule(LRScheduler):
    """The LR schedule: each param group's initial rate times ``multiplier(optimizer steps so far)``.

    It is torch's LambdaLR, a real ``LRScheduler`` (``get_last_lr()``, ``last_epoch``, ``base_lrs``), whose ``step``
    skips the checks LambdaLR runs every step (bench/schedule.py times both); its state_dict holds only numbers, so it
    saves and loads with weights_only (LambdaLR's would hold the multiplier).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, multiplier):
        self.multiplier = multiplier
        super().__init__(optimizer)  # records each group's initial_lr as base_lrs, then takes step 0

    def get_lr(self) -> list[float]:
        factor = self.multiplier(self.last_epoch)
        return [base_lr * factor for base_lr in self.base_lrs]

    def step(self, epoch=None) -> None:
        self.last_epoch += 1
        self._apply()

    def _apply(self) -> None:
        factor = self.multiplier(self.last_epoch)
        self._last_lr = []
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base_lr * factor
            self._last_lr.append(group["lr"])

    def state_dict(self) -> dict:
        return {"last_step": self.last_epoch, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict) -> None:
        self.last_epoch, self.base_lrs = state["last_step"], list(state["base_lrs"])
        self._apply()


def build_scheduler(optimizer: torch.optim.Optimizer, cfg, total_steps: int) -> StepSchedule:
    return StepSchedule(optimizer, lr_multiplier(cfg, total_steps))
