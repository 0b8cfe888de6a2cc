"""Learning-rate schedules, stepped once per optimizer step, with linear warmup; their state is checkpointed."""

from __future__ import annotations

import math

import torch


def lr_multiplier(cfg, total_steps: int):
    """The factor on each param group's learning rate after ``step`` optimizer steps.

    ``onecycle`` is a cosine with a warmup of 30% of the steps (unless ``sched.warmup_steps`` says otherwise).
    """
    s = cfg.sched
    warmup = s.warmup_steps or (round(0.3 * total_steps) if s.name == "onecycle" else 0)

    def multiplier(step: int) -> float:
        ramp = min(1.0, (step + 1) / warmup) if warmup else 1.0
        if s.name == "step":
            return ramp * s.gamma ** (step // s.step_size)
        if s.name in ("cosine", "onecycle"):
            progress = min(1.0, max(0, step - warmup) / max(1, total_steps - warmup))
            return ramp * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
        return ramp

    return multiplier


def build_scheduler(optimizer: torch.optim.Optimizer, cfg, total_steps: int):
    """A LambdaLR: its state_dict holds only numbers, so it saves and loads with weights_only."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg, total_steps))
