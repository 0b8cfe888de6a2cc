"""The optimizer, built from the recipe's parameter groups and the optim.* keys."""

from __future__ import annotations

import logging

import torch
from torch import nn

from launcher.errors import UserError

log = logging.getLogger(__name__)


def build_optimizer(model: nn.Module, groups: list[dict], cfg) -> torch.optim.Optimizer:
    """``optim.name`` over ``groups``; each group's own options (e.g. ``lr``) override the optim.* defaults."""
    groups = _materialize(groups)
    _warn_untrained(model, groups)
    o = cfg.optim
    try:
        if o.name == "sgd":
            return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        if o.name == "adam":
            return torch.optim.Adam(groups, lr=o.lr, weight_decay=o.weight_decay)
        return torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay)
    except (ValueError, TypeError) as error:  # e.g. a parameter in two groups, or an option the optimizer lacks
        raise UserError(f"the recipe's param_groups do not fit optim.name={o.name}: {error}") from None


def _materialize(groups: list[dict]) -> list[dict]:
    """Groups with their ``params`` as lists: recipes often pass generators (``net.features.parameters()``)."""
    if not all(isinstance(group, dict) and "params" in group for group in groups):
        raise UserError("param_groups(model, cfg) must return a list of dicts, each with a 'params' entry")
    return [dict(group, params=list(group["params"])) for group in groups]


def _warn_untrained(model: nn.Module, groups: list[dict]) -> None:
    grouped = {id(p) for group in groups for p in group["params"]}
    left_out = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in grouped]
    if left_out:
        log.warning("%d trainable parameters are in no param group and will not train: %s", len(left_out), left_out)
