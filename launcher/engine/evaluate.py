"""Evaluation: loss, and accuracy for classifiers, on rank 0 alone or sharded over all ranks.

It runs after each epoch, or on a saved checkpoint alone (``eval.only``, like torchvision's --test-only).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from launcher.checkpoint.files import check_model_fits
from launcher.checkpoint.formats import format_of, load_named, newest_good
from launcher.checkpoint.sharded import ShardsFailed, load_model_weights
from launcher.distributed.env import DistEnv
from launcher.distributed.group import on_main, run_agreed
from launcher.distributed.strategy import Strategy, strategy_for
from launcher.engine.batches import batch_size, to_device
from launcher.engine.build import build_model_and_data
from launcher.engine.data import build_eval_loader, eval_batches
from launcher.errors import UserError
from launcher.recipe import Recipe
from launcher.run.directory import run_dir_for

log = logging.getLogger(__name__)


def on_every_rank(cfg, strategy: Strategy) -> bool:
    """Whether every rank evaluates (``eval.sharded``, or a model whose every forward is a collective)."""
    return cfg.eval.sharded or strategy.sharded


@torch.no_grad()
def evaluate(model: nn.Module, dataset, recipe: Recipe, cfg, strategy: Strategy) -> dict:
    """``eval/loss`` and the recipe's metrics (by default accuracy, for a classifier).

    Of the unwrapped model (never the DDP wrapper: a DDP forward on one rank hangs the others), or of the sharded model.

    Every metric is a sum and a count per batch. Sharded, rank r evaluates batches r, r + world, ...; each batch's
    sums land in their own slot and the slots are summed in batch order, so the result equals the single-rank
    evaluation exactly, not just closely. Every rank must call this when ``on_every_rank``; only rank 0 otherwise.
    (Ranks and world are the data's: tensor-parallel peers evaluate the same batches, and one of them counts.)
    """
    dist_env, data, device = strategy.dist_env, strategy.data_env, strategy.device
    sharded = on_every_rank(cfg, strategy) and dist_env.is_distributed
    batches = eval_batches(len(dataset), cfg.eval.batch_size)
    if cfg.train.limit_eval_batches:
        batches = batches[: cfg.train.limit_eval_batches]
    slots: list[int | None] = list(range(data.rank, len(batches), data.world_size) if sharded
                                   else range(len(batches)))
    if sharded and strategy.sharded:
        # Every forward of a sharded model gathers parameters from every rank: all run as many, the short ones an
        # extra forward of the first batch whose result is dropped.
        slots += [None] * (-(-len(batches) // data.world_size) - len(slots))
    loader = build_eval_loader(dataset, [batches[0 if i is None else i] for i in slots], cfg, device, recipe.collate)
    rows, finish = {}, {}
    was_training = model.training
    model.eval()
    for slot, batch in zip(slots, loader):
        batch = to_device(batch, device, lambda tensor: tensor)
        loss, outputs = recipe.step(model, batch)
        if slot is None or not strategy.reports:
            continue
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


def checkpoint_to_evaluate(cfg, run_dir: Path, dist_env: DistEnv) -> tuple[Path, dict | None]:
    """``eval.only``: which checkpoint to evaluate.

    The named file, else the newest good checkpoint in run.dir, else its model.pt; and on rank 0 what it holds, when
    already loaded.
    """
    loaded: dict = {}

    def decide() -> str:
        if cfg.ckpt.resume not in ("auto", "never"):
            return cfg.ckpt.resume
        found = newest_good(run_dir / "checkpoints", None)
        if found:
            loaded["saved"] = found[1]
            return str(found[0])
        if (run_dir / "model.pt").is_file():
            return str(run_dir / "model.pt")
        raise UserError(f"eval.only=true found no checkpoint or model.pt in run.dir={run_dir}: pass "
                        "ckpt.resume=<checkpoint or model.pt>")

    return Path(on_main(dist_env, decide)), loaded.get("saved")


def evaluate_only(cfg, recipe: Recipe, dist_env: DistEnv, device: torch.device) -> None:
    """``eval.only=true``: evaluate a checkpoint or model.pt and print the metrics.

    The checkpoint is ``ckpt.resume``, else the run's newest; nothing is written.
    """
    strategy = strategy_for(cfg, dist_env, device)
    model, _, eval_set = build_model_and_data(cfg, recipe, dist_env, strategy.build_device)
    if eval_set is None:
        raise UserError("eval.only=true, but the recipe's build_datasets returns no eval set", same_on_all_ranks=True)
    model = strategy.prepare(model, recipe)
    path, saved = checkpoint_to_evaluate(cfg, run_dir_for(cfg, recipe), dist_env)

    def check_fit() -> dict | None:
        """The weights of a file (None for a folder of shards), verified and checked against the model.

        Rank 0 checks every shard's checksum, the others that each is there, as a resume does.
        """
        loaded, kind = saved or load_named(path, check_shards=dist_env.is_main), format_of(path)
        check_model_fits(model, kind.shapes(path, loaded), path)
        return None if kind.sharded else kind.weights(path, loaded)

    weights = run_agreed(dist_env, check_fit)
    try:
        load_model_weights(model, path, weights)  # collective where the model is sharded
    except ShardsFailed as error:
        raise UserError(f"ckpt.resume={path} does not load ({error})", same_on_all_ranks=True) from None
    if on_every_rank(cfg, strategy) or dist_env.is_main:
        metrics = evaluate(model, eval_set, recipe, cfg, strategy)
    if dist_env.is_main:
        log.info("evaluated %s | %s", path, " | ".join(f"{key} {value:.4f}" for key, value in metrics.items()))
