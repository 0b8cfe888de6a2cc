"""The run directory: run.dir, or runs/<recipe>/<id> with an id every rank (and every restart) agrees on."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import torch.distributed as dist

from launcher.dist_env import DistEnv
from launcher.recipe import Recipe


def new_run_id() -> str:
    """A fresh run id: readable, sortable, and unlikely to collide."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def choose_run_dir(cfg, recipe: Recipe, dist_env: DistEnv) -> Path:
    """``run.dir`` if set, else runs/<recipe>/<job id>; rank 0 picks a new id when nothing names the job."""
    if cfg.run.dir:
        return Path(cfg.run.dir)
    run_id = [dist_env.job_id or new_run_id()]
    if dist_env.is_distributed and dist_env.job_id is None:
        dist.broadcast_object_list(run_id, src=0)
    return Path("runs") / recipe.name / run_id[0]
