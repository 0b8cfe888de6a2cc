"""Agreeing on failure: an error on any rank during setup fails every rank, once, instead of hanging the rest."""

from __future__ import annotations

from typing import Callable

import torch.distributed as dist

from launcher.dist_env import DistEnv
from launcher.errors import UserError


def run_agreed(dist_env: DistEnv, build: Callable | None, name_rank: bool = True):
    """Run ``build`` (None: nothing) on this rank; if a UserError happens on any rank, every rank raises it.

    So a bad data path fails the job once, with one message from rank 0, instead of once per process or with
    the healthy ranks waiting forever in their next collective. The message names the rank it came from when
    some ranks succeeded (``name_rank``: where every rank ran ``build``).
    """
    result, error = None, None
    try:
        result = build() if build else None
    except UserError as caught:
        error = str(caught)
    errors = [error]
    if dist_env.is_distributed:
        errors = [None] * dist_env.world_size
        dist.all_gather_object(errors, error)
    failures = [(rank, message) for rank, message in enumerate(errors) if message]
    if failures:
        rank, message = failures[0]
        some = dist_env.is_distributed and len(failures) < dist_env.world_size
        where = f"rank {rank}: " if name_rank and some else ""
        raise UserError(where + message, same_on_all_ranks=True)
    return result


def on_main(dist_env: DistEnv, decide: Callable):
    """Rank 0 runs ``decide``; every rank gets its (small, picklable) result, or raises its UserError."""
    result = [run_agreed(dist_env, decide if dist_env.is_main else None, name_rank=False)]
    if dist_env.is_distributed:
        dist.broadcast_object_list(result, src=0)
    return result[0]
