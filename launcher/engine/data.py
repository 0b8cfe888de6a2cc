"""Data loaders for training and evaluation.

For training, each rank's share of the global batch, in an order a resumed epoch continues exactly; for evaluation,
whole batches.
"""

from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from launcher.distributed.env import DistEnv
from launcher.engine.resident import ResidentLoader, resident_tensors
from launcher.errors import UserError


class ResumableDistributedSampler(DistributedSampler):
    """Shuffles like DistributedSampler (a permutation seeded by seed + epoch) and keeps whole global batches only.

    Rank r takes every world-size-th index of the epoch's order, so a global batch is the same set of samples on
    any number of processes. ``set_epoch(epoch, consumed)`` leaves out the first ``consumed`` samples of that
    order: a resumed epoch continues with exactly the samples not yet seen, in the same order.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int, global_batch: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.usable_samples = len(dataset) // global_batch * global_batch  # in the epoch's full global batches
        self.consumed = 0

    def set_epoch(self, epoch: int, consumed: int = 0) -> None:
        super().set_epoch(epoch)
        self.consumed = consumed

    def __iter__(self):
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.dataset), generator=generator)[: self.usable_samples]
        return iter(order[self.consumed + self.rank :: self.num_replicas].tolist())

    def __len__(self) -> int:
        return (self.usable_samples - self.consumed) // self.num_replicas


def loader_workers(cfg, dist_env: DistEnv, device: torch.device) -> int:
    """The number of loader workers: ``data.num_workers``, or a choice for -1 (the default).

    For -1: none on a CPU, where the training itself needs the cores and an in-memory data set is fastest read in the
    process; on a GPU, 4 per process, or as many as the cores this process may use shared among the node's processes
    allow, keeping one for the process itself.
    """
    if cfg.data.num_workers >= 0:
        return cfg.data.num_workers
    if device.type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(4, cores // dist_env.local_world_size - 1))


def _loader_options(num_workers: int, device: torch.device, collate) -> dict:
    return dict(
        collate_fn=collate,  # None: the DataLoader's default (tensors, tuples, lists, dicts, nested)
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=num_workers > 0,
        # Its own generator: creating an iterator then draws worker seeds from it, not from the global RNG,
        # which would shift every random number after it (and break exact resume).
        generator=torch.Generator(),
    )


def build_train_loader(dataset: Dataset, cfg, dist_env: DistEnv, device: torch.device, collate=None):
    """A loader of per-rank batches (global batch / world size); position it with ``start_epoch``.

    Each step's global batch is the same set of samples whatever the number of processes: the sampler shuffles
    with the same seed everywhere, rank r takes every world-size-th index, and incomplete batches are dropped.
    """
    per_rank_batch = cfg.train.batch_size // (dist_env.world_size * cfg.train.grad_accum)  # one micro-batch
    sampler = ResumableDistributedSampler(
        dataset, dist_env.world_size, dist_env.rank, seed=cfg.train.seed, global_batch=cfg.train.batch_size
    )
    tensors = resident_tensors(dataset, cfg, device, "training")
    if tensors is not None:
        loader = ResidentLoader(dataset, tensors, batch_size=per_rank_batch, sampler=sampler)
    else:
        loader = DataLoader(dataset, batch_size=per_rank_batch, sampler=sampler, drop_last=True,
                            **_loader_options(loader_workers(cfg, dist_env, device), device, collate))
    if len(loader) == 0:
        raise UserError(
            f"train.batch_size={cfg.train.batch_size} is larger than the training set ({len(dataset)} samples): "
            f"use at most {len(dataset) - len(dataset) % dist_env.world_size}"
        )
    return loader


def steps_per_epoch(loader: DataLoader, global_batch: int) -> int:
    """Optimizer steps in a whole epoch."""
    return loader.sampler.usable_samples // global_batch


def start_epoch(loader: DataLoader, epoch: int, consumed: int) -> None:
    """Position ``loader`` ``consumed`` samples into ``epoch``.

    Worker seeds depend only on (seed, epoch, rank), so a resumed epoch's workers start as the original's did.
    """
    sampler = loader.sampler
    sampler.set_epoch(epoch, consumed)
    loader.generator.manual_seed((sampler.seed * 1_000_003 + epoch) * 1_009 + sampler.rank)


def eval_batches(num_samples: int, batch_size: int) -> list[list[int]]:
    """The evaluation set cut into fixed batches, the same however many ranks evaluate it."""
    return [list(range(start, min(start + batch_size, num_samples))) for start in range(0, num_samples, batch_size)]


def build_eval_loader(dataset: Dataset, batches: list[list[int]], cfg, device: torch.device, collate=None):
    """A loader over the given batches, in order: on the device (``data.resident``) or a DataLoader."""
    tensors = resident_tensors(dataset, cfg, device, "eval")
    if tensors is not None:
        return ResidentLoader(dataset, tensors, batches=batches)
    workers = 0 if cfg.data.num_workers < 0 else cfg.data.num_workers  # evaluation: no workers kept alive all run
    return DataLoader(dataset, batch_sampler=batches, **_loader_options(workers, device, collate))


def data_path(loader) -> str:
    """How batches reach the device, for the header."""
    if isinstance(loader, ResidentLoader):
        return f"on the device ({sum(tensor.nbytes for tensor in loader.tensors) / 2**20:,.1f} MB)"
    return f"through a DataLoader ({loader.num_workers} workers)"
