"""What the recipe describes, built the same way on every rank: seeded, and failing together when it fails."""

from __future__ import annotations

import random

import numpy as np
import torch

from launcher.data.streams import check_stream, is_stream
from launcher.distributed.env import DistEnv
from launcher.distributed.group import run_agreed
from launcher.engine.data import loader_workers
from launcher.errors import UserError
from launcher.recipe import Recipe


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model_and_data(cfg, recipe: Recipe, dist_env: DistEnv, device: torch.device):
    """(model on ``device``, train set, eval set or None), seeded with ``train.seed`` alike on every rank."""
    seed_everything(cfg.train.seed)  # the same on every rank: identical initial weights and datasets
    model = run_agreed(dist_env, lambda: recipe.build_model(cfg)).to(device)
    train_set, eval_set = _build_datasets(cfg, recipe, dist_env)
    if is_stream(train_set):
        _check_stream_run(train_set, cfg, dist_env, device)
    if eval_set is not None and is_stream(eval_set):
        raise UserError("the recipe's eval set is a stream: evaluation reads a data set of known length (a map-style "
                        "Dataset); return one, or None for no evaluation", same_on_all_ranks=True)
    if hasattr(train_set, "__len__") and len(train_set) == 0:
        raise UserError("the recipe's training set is empty: build_datasets must return samples to train on (is "
                        "data.root right?)", same_on_all_ranks=True)
    if eval_set is not None and len(eval_set) == 0:
        raise UserError("the recipe's eval set is empty: give it samples, or return None as the eval set for no "
                        "evaluation", same_on_all_ranks=True)
    return model, train_set, eval_set


def _check_stream_run(stream, cfg, dist_env: DistEnv, device: torch.device) -> None:
    """A stream the engine can split and a run that can train on it, or one line on every rank."""
    check_stream(stream, dist_env.world_size * max(1, loader_workers(cfg, dist_env, device)))
    if not cfg.train.max_steps:
        raise UserError("the recipe's training set is a stream, which has no length: set train.max_steps (and "
                        "eval.every_steps and ckpt.every_steps for evaluations and checkpoints along the way)",
                        same_on_all_ranks=True)
    if cfg.data.resident == "always":
        raise UserError("data.resident=always keeps a TensorDataset on the device, and the training set is a stream: "
                        "set data.resident=auto", same_on_all_ranks=True)


def _build_datasets(cfg, recipe: Recipe, dist_env: DistEnv):
    build = lambda: recipe.build_datasets(cfg)  # noqa: E731
    if not cfg.data.download:
        return run_agreed(dist_env, build)
    # Local rank 0 goes first, so each node downloads once and the others read finished files.
    first = run_agreed(dist_env, build if dist_env.local_rank == 0 else None)
    rest = run_agreed(dist_env, build if dist_env.local_rank != 0 else None)
    return first or rest
