"""Stopping on a signal: every rank stops after the same step, with a checkpoint.

Ctrl-C, SIGTERM, SIGUSR1 or SIGUSR2 on any rank starts the stop; a second one aborts at once.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from typing import Callable

import torch
import torch.distributed as dist

from launcher.distributed import early_signals
from launcher.distributed.env import DistEnv
from launcher.distributed.group import JobStore
from launcher.errors import LauncherError

# SIGUSR2 is what the Slurm templates relay through srun and torchrun (both pass it on without killing anything).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
STOP_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on request, checkpoint written, run the same command to continue


def shield_loader_worker(worker_id: int = 0) -> None:
    """In a DataLoader worker: the stop signals are its rank's to act on, never a reason for the worker to end.

    A signal to a whole process group (torchrun passes SIGTERM on with killpg, ``kill -TERM -PGID``, Ctrl-C in a
    terminal) would reach the workers too, and one that ended would fail the rank ("DataLoader worker ... killed by
    signal") instead of letting it stop with a checkpoint: the worker leaves the group. It still ends with its rank
    (``_end_with_rank``), and keeps SIGTERM's default, which the DataLoader and multiprocessing use to end a worker
    that did not stop on request.
    """
    os.setpgid(0, 0)
    for signum in (signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    _end_with_rank()


def _end_with_rank() -> None:
    """Have the kernel SIGKILL this DataLoader worker when its rank ends, however it ends.

    torch's worker looks for a dead parent only between two batches: one stuck in the recipe's ``__getitem__`` or
    ``collate`` would outlive a rank that failed, was killed or ended at once (``os._exit``), asleep for ever, out of
    the reach of torchrun's killpg (it left the group). The signal comes when the thread that forked the worker ends:
    the rank's main thread makes every DataLoader iterator (the epoch's, evaluation's), so that is the rank's end. A
    rank that ended before the signal was armed is seen in the parent pid, as ``group.end_with_parent`` explains.
    """
    rank = multiprocessing.parent_process()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux with glibc: nothing to do
        return
    if rank is not None and os.getppid() != rank.pid:
        os.kill(os.getpid(), signal.SIGKILL)


class StopRequested(LauncherError):
    """Training stopped on a signal after writing a checkpoint; not a failure."""

    exit_code = STOP_EXIT_CODE
    prefix = ""


class StopSignals:
    """The process's stop signals, caught from its start.

    A first one asks for a graceful stop (``requested``); a second Ctrl-C, or a second signal of another kind, ends the
    process at once. The same signal again is not a second request: relays deliver one signal twice (srun to every
    process of the step, and torchrun forwarding it too; a preemption's SIGTERM to every process, and torchrun's).

    A stop signal that arrives after another rank of the job failed is torchrun tearing the job down, not a request
    to checkpoint (no agreement can be reached any more): the process ends at once, in one line; unless it is
    ``failing`` itself, and finishing what its failure asks (a new run taken away), bounded by torchrun's SIGKILL.
    SIGHUP, which a worker gets when torchrun dies (``end_with_parent``; once per torchrun thread that ends) or its
    terminal hangs up, asks for a graceful stop and nothing more. Processes forked from this one (data-loader
    workers) ignore the signals: their parent decides.
    """

    def __init__(self, dist_env: DistEnv):
        self.requested: str | None = None  # the first stop signal's name
        self.job_store: JobStore | None = None  # once the process group exists
        self.failing = False  # this rank failed and is taking back what its run wrote: it ends once done
        self._dist_env, self._pid = dist_env, os.getpid()
        for signum in (*STOP_SIGNALS, signal.SIGHUP):
            signal.signal(signum, self._on_signal)
        for signum in early_signals.HELD:  # what arrived while torch was being imported
            self._on_signal(signum, None)

    def _on_signal(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            return
        name = signal.Signals(signum).name
        where = f"[rank {self._dist_env.rank}] " if self._dist_env.is_distributed else ""
        if signum == signal.SIGHUP:  # torchrun is gone, and the store it served with it
            self.requested = self.requested or name
            return
        failed = self.job_store.failure() if self.job_store else None
        if failed and self.failing:  # torchrun ending the job for this rank's failure (or one alike): it is ending
            return
        if failed:
            print(f"{where}launcher: {name}: stopping at once, as {failed} failed (its error is above)",
                  file=sys.stderr, flush=True)
            os._exit(1)
        if self.requested and (name != self.requested or signum == signal.SIGINT):
            print(f"{where}launcher: second stop signal ({name}): aborting at once, without a checkpoint",
                  file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.requested = name

    def check(self, doing: str) -> None:
        """Raise ``StopRequested`` if a stop signal came.

        For waits before training, where there is nothing to checkpoint (``doing`` says what was being waited for).
        """
        if self.requested:
            raise StopRequested(f"stopped by {self.requested} while {doing}: nothing was written; run the same "
                                "command to start")


class GracefulStop:
    """Lets all ranks agree, step by step, on whether to stop: on a signal (``StopSignals``) or a diverged loss.

    The agreement is an all-gather of a few CPU numbers per rank (gloo): the stop flags, then whatever ``measure``
    returns (each rank's own time and memory peaks, engine/rank_stats.py), so rank 0's progress reports learn them
    with no collective of their own. It is issued asynchronously every ``every`` steps and read ``every`` steps
    later, so it never stalls the training loop and costs a small model nothing measurable (one per step did:
    BENCHMARKS.md); a stop happens within ``2 * every`` steps of the signal, at the same step on every rank. One
    process needs no agreement: it stops after the current step.
    """

    def __init__(self, dist_env: DistEnv, signals: StopSignals, every: int = 1,
                 measure: Callable[[], list[float]] = list):
        self.signals = signals
        self.diverged_at: int | None = None  # agreed: the step at which rank 0 read a non-finite loss
        self.measured: list[list[float]] | None = None  # every rank's ``measure()`` at the last agreement read
        self._diverged_seen: int | None = None  # this rank's own reading, until agreed
        self._distributed, self._world_size, self._every = dist_env.is_distributed, dist_env.world_size, every
        self._measure = measure
        self._pending = None

    @property
    def signal_name(self) -> str | None:
        return self.signals.requested

    def diverged(self, step: int) -> None:
        """This rank read a non-finite loss after ``step``.

        Every rank stops at the next agreement, without a checkpoint (``diverged_at`` says where).
        """
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
            work, gathered = self._pending
            work.wait()
            rows = gathered.view(self._world_size, -1).tolist()  # the agreement's one host read
            self.diverged_at = int(max(row[1] for row in rows)) or None
            self.measured = [row[2:] for row in rows]
            agreed = any(row[0] for row in rows) or self.diverged_at is not None
        mine = torch.tensor([1.0 if self.signal_name else 0.0, float(self._diverged_seen or 0), *self._measure()],
                            dtype=torch.float64)
        gathered = torch.empty(self._world_size * len(mine), dtype=torch.float64)
        self._pending = (_all_gather(gathered, mine), gathered)
        return agreed

    def close(self) -> None:
        """Wait for the agreement still in flight."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None


def _all_gather(gathered: torch.Tensor, mine: torch.Tensor):
    """Start gathering every rank's ``mine`` into ``gathered``.

    all_gather_single is torch 2.14's name for what earlier versions call all_gather_into_tensor.
    """
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(gathered, mine, async_op=True)
