"""Agreeing on failure: an error on any rank during setup fails every rank, once, instead of hanging the rest."""

from __future__ import annotations

from typing import Callable

import torch.distributed as dist

from launcher.dist_env import DistEnv
from launcher.errors import LauncherError


def run_agreed(dist_env: DistEnv, build: Callable | None, name_rank: bool = True):
    """Run ``build`` (None: nothing) on this rank; if a LauncherError happens on any rank, every rank raises it (with
    its exit code).

    So a bad data path fails the job once, with one message from rank 0, instead of once per process or with
    the healthy ranks waiting forever in their next collective. The message names the rank it came from when
    some ranks succeeded (``name_rank``: where every rank ran ``build``).
    """
    result, error = None, None
    try:
        result = build() if build else None
    except LauncherError as caught:
        error = (str(caught), caught.exit_code)
    errors = [error]
    if dist_env.is_distributed:
        errors = [None] * dist_env.world_size
        dist.all_gather_object(errors, error)
    failures = [(rank, failure) for rank, failure in enumerate(errors) if failure]
    if failures:
        rank, (message, exit_code) = failures[0]
        some = dist_env.is_distributed and len(failures) < dist_env.world_size
        agreed = LauncherError(f"rank {rank}: {message}" if name_rank and some else message, same_on_all_ranks=True)
        agreed.exit_code = exit_code
        raise agreed
    return result


def on_main(dist_env: DistEnv, decide: Callable):
    """Rank 0 runs ``decide``; every rank gets its (small, picklable) result, or raises its LauncherError."""
    result = [run_agreed(dist_env, decide if dist_env.is_main else None, name_rank=False)]
    if dist_env.is_distributed:
        dist.broadcast_object_list(result, src=0)
    return result[0]
