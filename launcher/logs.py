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
        handler = _AroundProgressBar(sys.stdout)
        logger.setLevel(level.upper())
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"[rank {dist_env.rank}] %(message)s"))
        logger.setLevel(logging.ERROR)
        warnings.simplefilter("ignore")  # rank 0 shows them; the same warning from every rank is noise
    logger.addHandler(handler)
    logger.propagate = False


class _AroundProgressBar(logging.StreamHandler):
    """Lines written around tqdm's progress bar (cleared, written, drawn again) instead of onto it; plain lines where
    there is no bar. Other threads log here too (the wandb process's notices)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)
