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

    The agreement is an all-reduce of one CPU flag (gloo), issued asynchronously after each step and read after
    the next one, so it never stalls the training loop; a stop happens at most one step after the signal, at the
    same step on every rank.
    """

    def __init__(self, dist_env: DistEnv):
        self.signal_name: str | None = None
        self._distributed = dist_env.is_distributed
        self._pending = None
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def should_stop(self) -> bool:
        """Collective: every rank calls it once per step and gets the same answer."""
        if not self._distributed:
            return self.signal_name is not None
        agreed = False
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            agreed = bool(flag.item())
        flag = torch.tensor([1.0 if self.signal_name else 0.0])
        self._pending = (dist.all_reduce(flag, async_op=True), flag)
        return agreed

    def close(self) -> None:
        """Wait for the agreement still in flight and restore the default signal handlers."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
