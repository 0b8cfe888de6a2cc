"""The job's process group: joining it, leaving it, and agreeing on failure across it.

An error on any rank fails every rank once, instead of hanging the rest.
"""

from __future__ import annotations

import ctypes
import datetime
import os
import signal
from typing import Callable

import torch
import torch.distributed as dist

from launcher.config.machine import resolve_backend
from launcher.distributed.env import DistEnv
from launcher.errors import LauncherError, PeerFailed


def end_with_parent(parent: int | None = None) -> None:
    """Make this torchrun worker stop gracefully when the torchrun that started it dies.

    The worker gets SIGHUP when that torchrun dies, even by SIGKILL, and stops instead of training on with no parent
    (torchrun starts workers in sessions of their own, which no signal to torchrun's process group reaches).

    ``parent`` is the process that started this one, read as early as possible (``early_signals.PARENT``): if it is
    no longer the parent once the signal is armed, it died before, and the signal would never come. Comparing with
    1 instead would stop every run whose torchrun is PID 1 (a container without an init process) at once.
    """
    parent = os.getppid() if parent is None else parent
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGHUP)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux with glibc: nothing to do
        return
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGHUP)


class JobStore:
    """The key-value store every process of this attempt of the job reaches.

    It is the rendezvous store, under a prefix per attempt: where a failing rank says so, so that the others stop at
    once instead of waiting for it.
    """

    def __init__(self, client: dist.Store, restart_count: int):
        self._store = dist.PrefixStore(f"{_attempt_prefix(restart_count)}/job", client)

    def report_failure(self, who: str, kind: str) -> str | None:
        """Say that ``who`` failed, with an error of ``kind``.

        Returns who said it first, where another rank failed with the same kind of error (every rank failing alike at
        one step): that rank shows it, this one need not.
        """
        mine = f"{who}\n{kind}"
        try:
            first = self._store.compare_set("failed", "", mine).decode()  # the first failure is the one to name
        except Exception:  # the store is gone with its host: the job is ending anyway
            return None
        first_who, _, first_kind = first.partition("\n")
        return first_who if first != mine and first_kind == kind else None

    def failure(self) -> str | None:
        """Who failed, if any rank said so (a store that cannot be reached says nothing)."""
        try:
            return self._store.get("failed").decode().partition("\n")[0] if self._store.check(["failed"]) else None
        except Exception:
            return None


def _attempt_prefix(restart_count: int) -> str:
    return f"launcher/attempt_{restart_count}"


def _store_client(dist_env: DistEnv, timeout: datetime.timedelta) -> dist.Store:
    """A client of the job's rendezvous store (torchrun's agent's, or rank 0's)."""
    return dist.TCPStore(dist_env.master_addr, dist_env.master_port, is_master=False, timeout=timeout,
                         wait_for_workers=False)


def init_process_group(dist_env: DistEnv, backend: str, device: torch.device, timeout_s: int,
                       even_alone: bool = False) -> JobStore | None:
    """Join the job's process group (torchrun's env:// rendezvous), and return the job's store.

    For a single process: nothing, or (``even_alone``: FSDP2 and distributed checkpoints need one) a group of one.
    """
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = resolve_backend(backend)
    if not dist_env.is_distributed:
        if even_alone:
            dist.init_process_group(backend="cpu:gloo,cuda:nccl" if backend == "nccl" else backend,
                                    store=dist.HashStore(), rank=0, world_size=1,
                                    device_id=device if device.type == "cuda" else None)
        return None
    if backend == "nccl":
        record_nccl_collectives()
    timeout = datetime.timedelta(seconds=timeout_s)
    client = _store_client(dist_env, timeout) if _agent_store_per_attempt(dist_env) else None
    dist.init_process_group(
        **({"store": dist.PrefixStore(_attempt_prefix(dist_env.restart_count), client), "rank": dist_env.rank,
            "world_size": dist_env.world_size} if client else {}),
        # CPU tensors (stop flags, small agreements) go through gloo on the same group, even on GPUs: a separate
        # group made with new_group would find stale rendezvous keys after an elastic restart and hang.
        backend="cpu:gloo,cuda:nccl" if backend == "nccl" else backend,
        timeout=timeout,
        device_id=device if device.type == "cuda" else None,
    )
    return JobStore(client or _store_client(dist_env, timeout), dist_env.restart_count)


def record_nccl_collectives() -> None:
    """Keep NCCL's flight recorder on: the last collectives of each rank, dumped when one times out.

    The dump goes where ``StackWatch.start`` points it (the run directory's stacks/). The user's own settings win.
    """
    for name in ("TORCH_NCCL_TRACE_BUFFER_SIZE", "TORCH_FR_BUFFER_SIZE"):  # the second is torch 2.7's and later's
        os.environ.setdefault(name, "2000")
    os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")


def _agent_store_per_attempt(dist_env: DistEnv) -> bool:
    """Whether to give each torchrun restart its own key space in the agent's store.

    torchrun shares one store across restarts of the worker group and nothing separates them (pytorch#135712):
    a restarted group reads the dead group's addresses and fails to connect. On one node the restart count is
    the same for every worker, so it can name the attempt. Across nodes it is not: there, start torchrun with
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, which gives every attempt a fresh store (and turns this off).
    """
    return dist_env.agent_store and dist_env.world_size == dist_env.local_world_size


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def run_agreed(dist_env: DistEnv, build: Callable | None, name_rank: bool = True):
    """Run ``build`` (None: nothing) on this rank, and fail every rank if any rank fails.

    If a LauncherError happens on any rank, every rank raises it (of its class, with its exit code).

    So a bad data path fails the job once, with one message from rank 0, instead of once per process or with
    the healthy ranks waiting forever in their next collective. The message names the rank it came from when
    some ranks succeeded (``name_rank``: where every rank ran ``build``).
    """
    result, error = None, None
    try:
        result = build() if build else None
    except LauncherError as caught:
        error = (type(caught), str(caught), caught.exit_code)
    errors = [error]
    if dist_env.is_distributed:
        errors = [None] * dist_env.world_size
        dist.all_gather_object(errors, error)
    failures = [(rank, failure) for rank, failure in enumerate(errors) if failure]
    if failures:
        rank, (kind, message, exit_code) = failures[0]
        some = dist_env.is_distributed and len(failures) < dist_env.world_size
        agreed = kind(f"rank {rank}: {message}" if name_rank and some else message, same_on_all_ranks=True)
        agreed.exit_code = exit_code
        raise agreed
    return result


def on_main(dist_env: DistEnv, decide: Callable):
    """Rank 0 runs ``decide``; every rank gets its (small, picklable) result, or raises its LauncherError."""
    result = [run_agreed(dist_env, decide if dist_env.is_main else None, name_rank=False)]
    if dist_env.is_distributed:
        dist.broadcast_object_list(result, src=0)
    return result[0]


def timed_out_waiting(error: BaseException | None) -> bool:
    """Whether ``error`` is a collective that timed out, or an error raised while handling one.

    Gloo says so in a plain RuntimeError's text; a checkpoint's write that failed on it raises its own error.
    """
    while error is not None:
        text = str(error)
        if isinstance(error, RuntimeError) and (
                "Timed out" in text or isinstance(error, dist.DistError) and "timeout" in text.lower()):
            return True
        error = error.__cause__ or error.__context__
    return False


def peer_failure(error: BaseException, timeout_s: int, job_store: JobStore | None,
                 diagnose: Callable[[int], str | None] = lambda timeout_s: None) -> PeerFailed | None:
    """The one line to say when a collective failed because of another rank, else None.

    Either the collective timed out (``diagnose`` then names the ranks that did not arrive, and where each was), or
    the rank's process ended. A lost connection raises ``DistNetworkError`` where
    torch wraps it; gloo (torch 2.14) raises both its timeouts and lost connections as plain RuntimeErrors, which only
    their text tells apart.
    """
    timed_out = timed_out_waiting(error)
    if not isinstance(error, RuntimeError) and not timed_out:  # DistError and its subclasses are RuntimeErrors
        return None
    text = str(error)
    closed = isinstance(error, dist.DistNetworkError) or any(
        sign in text for sign in ("Connection closed by peer", "Connection reset by peer", "Broken pipe"))
    if not (timed_out or closed):
        return None
    failed = (job_store.failure() if job_store else None) or "another rank"
    failed = "another rank" if failed == f"rank {dist.get_rank()}" else failed  # this rank said it first
    if timed_out:
        named = diagnose(timeout_s)
        if named:
            return PeerFailed(named)
        return PeerFailed(
            f"a collective operation did not finish within dist.timeout_s={timeout_s} s: {failed} is stuck or has "
            f"died (see its output); the backend said: {text.splitlines()[0]}")
    return PeerFailed(f"stopped: {failed} ended while this rank waited for it (its error, if it had one, is above)")
