"""Evaluation: loss, and accuracy for classifiers, on rank 0 alone or sharded over all ranks; after each epoch, or
of a saved checkpoint alone (``eval.only``, like torchvision's --test-only)."""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist
from torch import nn

from launcher.checkpoint.files import check_model_fits
from launcher.checkpoint.resume import checkpoint_to_evaluate, is_checkpoint, load_named
from launcher.distributed.env import DistEnv
from launcher.distributed.group import run_agreed
from launcher.engine.batches import batch_size, to_device
from launcher.engine.build import build_model_and_data
from launcher.engine.data import build_eval_loader, eval_batches
from launcher.errors import UserError
from launcher.recipe import Recipe
from launcher.run.directory import run_dir_for

log = logging.getLogger(__name__)


@torch.no_grad()
def evaluate(model: nn.Module, dataset, recipe: Recipe, cfg, device: torch.device, dist_env: DistEnv) -> dict:
    """``eval/loss`` and the recipe's metrics (by default accuracy, for a classifier) of the unwrapped model (never
    the DDP wrapper: a DDP forward on one rank hangs the others).

    Every metric is a sum and a count per batch. Sharded, rank r evaluates batches r, r + world, ...; each batch's
    sums land in their own slot and the slots are summed in batch order, so the result equals the single-rank
    evaluation exactly, not just closely. Every rank must call this when ``eval.sharded``; only rank 0 otherwise.
    """
    sharded = cfg.eval.sharded and dist_env.is_distributed
    batches = eval_batches(len(dataset), cfg.eval.batch_size)
    if cfg.train.limit_eval_batches:
        batches = batches[: cfg.train.limit_eval_batches]
    owned = range(dist_env.rank, len(batches), dist_env.world_size) if sharded else range(len(batches))
    loader = build_eval_loader(dataset, [batches[i] for i in owned], cfg, device, recipe.collate)
    rows, finish = {}, {}
    was_training = model.training
    model.eval()
    for slot, batch in zip(owned, loader):
        batch = to_device(batch, device, lambda tensor: tensor)
        loss, outputs = recipe.step(model, batch)
        size = batch_size(batch)
        rows[slot] = {"loss": (loss.double() * size, size), **recipe.metrics(outputs, batch)}
        finish.update((name, value[2]) for name, value in rows[slot].items() if len(value) > 2)
    model.train(was_training)
    names = _metric_names(rows, sharded)
    table = torch.zeros(len(batches), len(names), 2, dtype=torch.float64, device=device)
    for slot, row in rows.items():
        table[slot] = torch.stack([_pair(row.get(name, (0, 0)), device) for name in names])
    if sharded:
        dist.all_reduce(table)  # each slot has one non-zero contributor: the sum is exact
    metrics = {}
    for name, (total, count) in zip(names, table.sum(dim=0).tolist()):
        value = total / count if count else math.nan
        metrics[f"eval/{name}"] = finish[name](value) if name in finish else value
    return metrics


def _metric_names(rows: dict, sharded: bool) -> list[str]:
    """The metrics any rank's batches produced: loss first, then the recipe's in sorted order."""
    names = {name for row in rows.values() for name in row}
    if sharded:
        every_rank = [None] * dist.get_world_size()
        dist.all_gather_object(every_rank, names)
        names = set().union(*every_rank)
    return ["loss", *sorted(names - {"loss"})]


def _pair(value: tuple, device: torch.device) -> torch.Tensor:
    """A metric's (sum, count) as one float64 pair on ``device``."""
    return torch.stack([torch.as_tensor(part, device=device).double().reshape(()) for part in value[:2]])


def evaluate_only(cfg, recipe: Recipe, dist_env: DistEnv, device: torch.device) -> None:
    """``eval.only=true``: evaluate a checkpoint or model.pt (``ckpt.resume``, else the run's newest) and print the
    metrics; nothing is written."""
    model, _, eval_set = build_model_and_data(cfg, recipe, dist_env, device)
    if eval_set is None:
        raise UserError("eval.only=true, but the recipe's build_datasets returns no eval set", same_on_all_ranks=True)
    path, payload = checkpoint_to_evaluate(cfg, run_dir_for(cfg, recipe), dist_env)

    def load_weights():
        loaded = payload or load_named(path)
        weights = loaded["model"] if is_checkpoint(loaded) else loaded
        check_model_fits(model, weights, path)
        model.load_state_dict(weights)

    run_agreed(dist_env, load_weights)
    if cfg.eval.sharded or dist_env.is_main:
        metrics = evaluate(model, eval_set, recipe, cfg, device, dist_env)
    if dist_env.is_main:
        log.info("evaluated %s | %s", path, " | ".join(f"{key} {value:.4f}" for key, value in metrics.items()))
