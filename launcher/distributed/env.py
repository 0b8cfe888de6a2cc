"""The distributed environment, read once from the process environment and passed around as a value."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

import torch

from launcher.config.machine import resolve_backend


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
    requeue_count: int = 0  # Slurm's restarts (requeues) of this job so far
    max_restarts: int = 0  # torchrun's --max-restarts: a worker that exits non-zero is started again
    agent_store: bool = False  # torchrun's agent serves the store that init_process_group uses
    omp_threads: int | None = None  # OMP_NUM_THREADS, where set (torchrun sets 1 when it starts several processes)

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
            requeue_count=int(environ.get("SLURM_RESTART_COUNT", 0)),
            max_restarts=int(environ.get("TORCHELASTIC_MAX_RESTARTS", 0)),
            agent_store=environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True",
            omp_threads=_threads(environ.get("OMP_NUM_THREADS", "")),
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def attempt(self) -> tuple[int, int]:
        """Which attempt of the job this is (Slurm requeues, torchrun restarts).

        A later attempt's is larger, and the job's scheduler ends every process of an attempt before it starts the next.
        """
        return self.requeue_count, self.restart_count


def _threads(omp_num_threads: str) -> int | None:
    """The thread count OMP_NUM_THREADS sets (its first level's, as in "4,2"), if it sets one."""
    first = omp_num_threads.split(",")[0].strip()
    return int(first) if first.isdigit() and int(first) > 0 else None


def usable_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_threads(dist_env: DistEnv, requested: int = 0) -> int:
    """How many threads this process's torch operations use on the CPU.

    ``requested`` (``dist.threads``), or for 0 OMP_NUM_THREADS where set, else the usable cores less one, shared by
    the node's processes, at least 1.

    Not every core: OpenMP's threads wait for each other at the end of each operation, so when one of them loses its
    core (to this process's other threads: gloo's, a checkpoint writer, wandb's process; or to another program), every
    operation waits for the scheduler to give it back. One process of lenet on a 2-core machine: 58 steps/s on 2
    threads alone, but 15 beside one busy program, against 40 on 1 thread either way; with the machine shared by
    other jobs' test runs, digits on 2 threads was 14 times slower than on 1.
    """
    if requested:
        return requested
    if dist_env.omp_threads:
        return dist_env.omp_threads
    return max(1, (usable_cores() - 1) // dist_env.local_world_size)


def device_for(dist_env: DistEnv, backend: str) -> torch.device:
    """One GPU per process (by local rank) under nccl; the CPU otherwise."""
    if resolve_backend(backend) == "nccl":
        return torch.device("cuda", dist_env.local_rank)
    return torch.device("cpu")
