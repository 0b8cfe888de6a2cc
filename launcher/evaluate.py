"""Evaluation: loss, and accuracy for classifiers, on rank 0 alone or sharded over all ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from launcher.data import build_eval_loader, eval_batches
from launcher.dist_env import DistEnv


def _is_classification(outputs: torch.Tensor, targets: torch.Tensor) -> bool:
    return outputs.dim() == 2 and not targets.is_floating_point() and targets.dim() == 1


@torch.no_grad()
def evaluate(model: nn.Module, dataset, loss_fn, cfg, device: torch.device, dist_env: DistEnv, sharded: bool,
             predict=lambda outputs: outputs) -> dict:
    """Evaluate the unwrapped model (never the DDP wrapper: a DDP forward on one rank hangs the others).

    Sharded, rank r evaluates batches r, r + world, ...; each batch's sums land in their own slot and the slots
    are summed in batch order, so the result equals the single-rank evaluation exactly, not just closely.
    Every rank must call this when ``sharded``; only rank 0 otherwise.
    """
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
        loss_sums[slot] = loss_fn(outputs, targets).double() * len(targets)
        scores = predict(outputs)
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
