"""Logging: rank 0 tells the story on stdout; the other ranks speak only of errors, on stderr."""

from __future__ import annotations

import logging
import sys
import warnings

from launcher.dist_env import DistEnv


def setup_logging(dist_env: DistEnv, level: str = "info") -> None:
    """Rank 0 logs at ``level`` (the ``log.level`` key) to stdout; other ranks only errors, to stderr."""
    logger = logging.getLogger("launcher")
    logger.handlers.clear()
    if dist_env.is_main:
        handler = logging.StreamHandler(sys.stdout)
        logger.setLevel(level.upper())
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"[rank {dist_env.rank}] %(message)s"))
        logger.setLevel(logging.ERROR)
        warnings.simplefilter("ignore")  # rank 0 shows them; the same warning from every rank is noise
    logger.addHandler(handler)
    logger.propagate = False
