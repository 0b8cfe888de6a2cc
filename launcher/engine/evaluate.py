"""Evaluation: loss, and accuracy for classifiers, on rank 0 alone or sharded over all ranks; after each epoch, or
of a saved checkpoint alone (``eval.only``, like torchvision's --test-only)."""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn

from launcher.checkpoint.files import check_model_fits
from launcher.checkpoint.resume import checkpoint_to_evaluate, is_checkpoint, load_named
from launcher.distributed.env import DistEnv
from launcher.distributed.group import run_agreed
from launcher.engine.build import build_model_and_data
from launcher.engine.data import build_eval_loader, eval_batches
from launcher.errors import UserError
from launcher.recipe import Recipe
from launcher.run.directory import run_dir_for

log = logging.getLogger(__name__)


def _is_classification(outputs: torch.Tensor, targets: torch.Tensor) -> bool:
    return outputs.dim() == 2 and not targets.is_floating_point() and targets.dim() == 1


@torch.no_grad()
def evaluate(model: nn.Module, dataset, recipe: Recipe, cfg, device: torch.device, dist_env: DistEnv) -> dict:
    """Evaluate the unwrapped model (never the DDP wrapper: a DDP forward on one rank hangs the others).

    Sharded, rank r evaluates batches r, r + world, ...; each batch's sums land in their own slot and the slots
    are summed in batch order, so the result equals the single-rank evaluation exactly, not just closely.
    Every rank must call this when ``eval.sharded``; only rank 0 otherwise.
    """
    sharded = cfg.eval.sharded
    batches = eval_batches(len(dataset), cfg.eval.batch_size)
    if cfg.train.limit_eval_batches:
        batches = batches[: cfg.train.limit_eval_batches]
    samples = sum(len(batch) for batch in batches)
    owned = range(dist_env.rank, len(batches), dist_env.world_size) if sharded else range(len(batches))
    loss_sums = torch.zeros(len(batches), dtype=torch.float64, device=device)
    correct = torch.zeros(len(batches), dtype=torch.int64, device=device)
    classification = torch.zeros((), dtype=torch.int64, device=device)
    loader = build_eval_loader(dataset, [batches[i] for i in owned], cfg.data.num_workers, device)
    was_training = model.training
    model.eval()
    for slot, (inputs, targets) in zip(owned, loader):
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        outputs = model(inputs)
        loss_sums[slot] = recipe.loss(outputs, targets).double() * len(targets)
        scores = recipe.predictions(outputs)
        if isinstance(scores, torch.Tensor) and _is_classification(scores, targets):
            classification.fill_(1)
            correct[slot] = (scores.argmax(dim=1) == targets).sum()
    model.train(was_training)
    if sharded and dist_env.is_distributed:
        for tensor in (loss_sums, correct, classification):
            dist.all_reduce(tensor)  # each slot has one non-zero contributor: the sum is exact
    metrics = {"eval/loss": (loss_sums.sum() / samples).item()}
    if classification.item():
        metrics["eval/accuracy"] = correct.sum().item() / samples
    return metrics


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
