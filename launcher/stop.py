"""Graceful stop: SIGTERM, SIGUSR1 or SIGUSR2 on any rank becomes a stop every rank makes after the same step."""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

from launcher.dist_env import DistEnv
from launcher.errors import LauncherError

# SIGUSR2 is what the Slurm templates relay through srun and torchrun (both pass it on without killing anything).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
STOP_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on request, checkpoint written, run the same command to continue


class StopRequested(LauncherError):
    """Training stopped on a signal after writing a checkpoint; not a failure."""

    exit_code = STOP_EXIT_CODE
    prefix = ""


class GracefulStop:
    """Catches the stop signals, and lets all ranks agree, step by step, on whether to stop.

    The agreement is an all-reduce of one CPU flag (gloo), issued asynchronously every ``every`` steps and read
    ``every`` steps later, so it never stalls the training loop and costs a small model nothing measurable (one
    per step cost a 2-process CPU run of a small MLP several percent); a stop happens within ``2 * every`` steps of
    the signal, at the same step on every rank. One process needs no agreement: it stops after the current step.
    """

    def __init__(self, dist_env: DistEnv, every: int = 1):
        self.signal_name: str | None = None
        self.diverged_at: int | None = None  # agreed: the step at which rank 0 read a non-finite loss
        self._diverged_seen: int | None = None  # this rank's own reading, until agreed
        self._distributed, self._every = dist_env.is_distributed, every
        self._pending = None
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def diverged(self, step: int) -> None:
        """This rank read a non-finite loss after ``step``: every rank stops at the next agreement, without a
        checkpoint (``diverged_at`` says where)."""
        if self._diverged_seen is None:
            self._diverged_seen = step

    def should_stop(self, step: int) -> bool:
        """Collective: every rank calls it after each optimizer step (``step``) and gets the same answer."""
        if not self._distributed:
            self.diverged_at = self._diverged_seen
            return self.signal_name is not None or self.diverged_at is not None
        if step % self._every:
            return False
        agreed = False
        if self._pending is not None:
            work, flags = self._pending
            work.wait()
            signalled, diverged_at = flags.tolist()
            self.diverged_at = int(diverged_at) or None
            agreed = bool(signalled) or self.diverged_at is not None
        flags = torch.tensor([1.0 if self.signal_name else 0.0, float(self._diverged_seen or 0)], dtype=torch.float64)
        self._pending = (dist.all_reduce(flags, op=dist.ReduceOp.MAX, async_op=True), flags)
        return agreed

    def close(self) -> None:
        """Wait for the agreement still in flight and restore the default signal handlers."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
