"""What a config asks of the machine it runs on and of torch: GPUs for nccl, DDP's buckets for torch.compile."""

from __future__ import annotations

import torch
import torch.distributed as dist

from launcher.errors import UserError


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


def first_bucket_mb() -> float:
    """The size of the small first bucket DDP all-reduces early.

    torch keeps it in a private constant, read when asked (not at import), and taken as its value today, 1 MiB,
    should torch rename it.
    """
    return getattr(dist, "_DEFAULT_FIRST_BUCKET_BYTES", 2**20) / 2**20


def check_compile_buckets(cfg, world_size: int) -> None:
    """TorchDynamo's DDPOptimizer refuses buckets smaller than DDP's first one (an assertion deep in torch)."""
    if cfg.train.compile and world_size > 1 and cfg.dist.bucket_cap_mb < first_bucket_mb():
        raise UserError(f"dist.bucket_cap_mb={cfg.dist.bucket_cap_mb} must be at least {first_bucket_mb():g} "
                        "(DDP's first bucket) with train.compile=true; use e.g. dist.bucket_cap_mb=25")
