"""The distributed environment, read once from the process environment and passed around as a value."""

from __future__ import annotations

import ctypes
import datetime
import os
import signal
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as dist

from launcher.errors import UserError

BACKENDS = ("auto", "gloo", "nccl")
FIRST_BUCKET_MB = dist._DEFAULT_FIRST_BUCKET_BYTES / 2**20  # DDP all-reduces a small first bucket early


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands in the job: its ranks, the world, and the id that names the job.

    ``job_id`` is stable for the whole job (the Slurm job id, <array job>_<task> for array tasks, else torchrun's
    rendezvous id), so a restarted or requeued job finds the same run directory; ``None`` when nothing names it.
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    under_torchrun: bool = False
    job_id: str | None = None
    job_group: str | None = None  # the Slurm array job a task belongs to: its sweep
    master_addr: str = "localhost"
    master_port: int = 0
    restart_count: int = 0  # torchrun's restarts of this worker group so far
    max_restarts: int = 0  # torchrun's --max-restarts: a worker that exits non-zero is started again
    agent_store: bool = False  # torchrun's agent serves the store that init_process_group uses

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> "DistEnv":
        """Read the variables torchrun (and Slurm) set; the only place the engine looks at them."""
        under_torchrun = "TORCHELASTIC_RUN_ID" in environ or "LOCAL_RANK" in environ
        array_job, array_task = environ.get("SLURM_ARRAY_JOB_ID"), environ.get("SLURM_ARRAY_TASK_ID")
        slurm_id = f"{array_job}_{array_task}" if array_job and array_task else environ.get("SLURM_JOB_ID")
        job_id = slurm_id or environ.get("TORCHELASTIC_RUN_ID")
        return cls(
            rank=int(environ.get("RANK", 0)),
            local_rank=int(environ.get("LOCAL_RANK", 0)),
            world_size=int(environ.get("WORLD_SIZE", 1)),
            local_world_size=int(environ.get("LOCAL_WORLD_SIZE", 1)),
            under_torchrun=under_torchrun,
            # plain `torchrun` without --rdzv-id names every job "none": that names nothing.
            job_id=None if job_id in (None, "", "none") else job_id,
            job_group=array_job if array_job and array_task else None,
            master_addr=environ.get("MASTER_ADDR", "localhost"),
            master_port=int(environ.get("MASTER_PORT", 0)),
            restart_count=int(environ.get("TORCHELASTIC_RESTART_COUNT", 0)),
            max_restarts=int(environ.get("TORCHELASTIC_MAX_RESTARTS", 0)),
            agent_store=environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True",
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def resolve_backend(backend: str) -> str:
    """``auto`` means nccl where there are GPUs, gloo otherwise."""
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return backend


def check_backend(backend: str, procs_per_node: int) -> None:
    """Fail early when the backend cannot serve ``procs_per_node`` processes on this machine."""
    if resolve_backend(backend) != "nccl":
        return
    gpus = torch.cuda.device_count()
    if gpus == 0:
        raise UserError(
            f"dist.backend={backend} needs CUDA GPUs, and this machine has none: use dist.backend=gloo "
            "(or auto, which picks gloo without GPUs)"
        )
    if procs_per_node > gpus:
        raise UserError(
            f"{procs_per_node} processes per node with dist.backend={backend}, but this machine has {gpus} GPU(s): "
            f"use at most {gpus} processes per node (one per GPU), or dist.backend=gloo"
        )


def device_for(dist_env: DistEnv, backend: str) -> torch.device:
    """One GPU per process (by local rank) under nccl; the CPU otherwise."""
    if resolve_backend(backend) == "nccl":
        return torch.device("cuda", dist_env.local_rank)
    return torch.device("cpu")


def end_with_parent() -> None:
    """A torchrun worker gets SIGHUP when the torchrun that started it dies, even by SIGKILL: it stops gracefully
    instead of training on with no parent (torchrun starts workers in sessions of their own, which no signal to
    torchrun's process group reaches)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGHUP)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux with glibc: nothing to do
        return
    if os.getppid() == 1:  # the parent died before the call: the signal would never come
        os.kill(os.getpid(), signal.SIGHUP)


class JobStore:
    """The key-value store every process of this attempt of the job reaches (the rendezvous store, under a prefix
    per attempt): where a failing rank says so, so that the others stop at once instead of waiting for it."""

    def __init__(self, client: dist.Store, restart_count: int):
        self._store = dist.PrefixStore(f"{_attempt_prefix(restart_count)}/job", client)

    def report_failure(self, who: str) -> None:
        try:
            self._store.compare_set("failed", "", who)  # the first failure is the one to name
        except Exception:  # the store is gone with its host: the job is ending anyway
            pass

    def failure(self) -> str | None:
        """Who failed, if any rank said so (a store that cannot be reached says nothing)."""
        try:
            return self._store.get("failed").decode() if self._store.check(["failed"]) else None
        except Exception:
            return None


def _attempt_prefix(restart_count: int) -> str:
    return f"launcher/attempt_{restart_count}"


def _store_client(dist_env: DistEnv, timeout: datetime.timedelta) -> dist.Store:
    """A client of the job's rendezvous store (torchrun's agent's, or rank 0's)."""
    return dist.TCPStore(dist_env.master_addr, dist_env.master_port, is_master=False, timeout=timeout,
                         wait_for_workers=False)


def init_process_group(dist_env: DistEnv, backend: str, device: torch.device, timeout_s: int) -> JobStore | None:
    """Join the job's process group (torchrun's env:// rendezvous), and return the job's store; nothing for a
    single process."""
    if not dist_env.is_distributed:
        return None
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = resolve_backend(backend)
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


def _agent_store_per_attempt(dist_env: DistEnv) -> bool:
    """Whether to give each torchrun restart its own key space in the agent's store.

    torchrun shares one store across restarts of the worker group and nothing separates them (pytorch#135712):
    a restarted group reads the dead group's addresses and fails to connect. On one node the restart count is
    the same for every worker, so it can name the attempt. Across nodes it is not: there, start torchrun with
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, which gives every attempt a fresh store (and turns this off).
    """
    return dist_env.agent_store and dist_env.world_size == dist_env.local_world_size


def destroy_process_group(dist_env: DistEnv) -> None:
    if dist_env.is_distributed and dist.is_initialized():
        dist.destroy_process_group()
