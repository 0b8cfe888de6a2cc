"""Data loaders for training and evaluation.

For training, each rank's share of the global batch, in an order a resumed epoch continues exactly; for evaluation,
whole batches.
"""

from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader, Dataset

from launcher.data.indexed import IndexedLoader, indexed_source
from launcher.data.sampler import ResumableDistributedSampler, SeededCollate, SeededSamples
from launcher.data.streams import StreamLoader, is_stream
from launcher.distributed.env import DistEnv
from launcher.distributed.stacks import answer_for_rank
from launcher.distributed.stop import shield_loader_worker
from launcher.errors import UserError


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


def start_loader_worker(worker_id: int) -> None:
    """Every DataLoader worker's start (its ``worker_init_fn``).

    It leaves stopping to its rank and ends with it (distributed/stop.py), and answers the rank's requests for its
    stacks (distributed/stacks.py).
    """
    shield_loader_worker(worker_id)
    answer_for_rank()


def _loader_options(num_workers: int, device: torch.device, collate) -> dict:
    return dict(
        collate_fn=collate,  # None: the DataLoader's default (tensors, tuples, lists, dicts, nested)
        num_workers=num_workers,
        worker_init_fn=start_loader_worker,
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
    if is_stream(dataset):
        return _stream_loader(dataset, cfg, dist_env, device, collate, per_rank_batch)
    source = indexed_source(dataset, cfg, device, "training", collate)
    # Read sample by sample, each sample's random numbers are seeded by its place in the epoch (data/sampler.py).
    sampler = ResumableDistributedSampler(dataset, dist_env.world_size, dist_env.rank, seed=cfg.train.seed,
                                          global_batch=cfg.train.batch_size, seeded=source is None)
    if source is not None:
        loader = IndexedLoader(dataset, source, batch_size=per_rank_batch, sampler=sampler)
    else:
        samples = SeededSamples(dataset)
        loader = DataLoader(samples, batch_size=per_rank_batch, sampler=sampler, drop_last=True,
                            **_loader_options(loader_workers(cfg, dist_env, device), device,
                                              collate and SeededCollate(collate, samples)))
    if len(loader) == 0:
        raise UserError(
            f"train.batch_size={cfg.train.batch_size} is larger than the training set ({len(dataset)} samples): "
            f"use at most {len(dataset) - len(dataset) % dist_env.world_size}"
        )
    return loader


def _stream_loader(stream, cfg, dist_env: DistEnv, device: torch.device, collate, per_rank_batch: int):
    """A stream's loader: its shards split over the job's processes and their workers (data/streams.py)."""
    workers = loader_workers(cfg, dist_env, device)  # engine/build.py checked the stream for these parts
    options = {key: value for key, value in _loader_options(workers, device, collate).items()
               if key in ("pin_memory", "generator", "worker_init_fn")}
    return StreamLoader(stream, dist_env.rank, dist_env.world_size, workers, per_rank_batch, cfg.train.grad_accum,
                        collate, cfg.train.seed, options)


def steps_per_epoch(loader, cfg) -> int:
    """Optimizer steps in a whole epoch; a stream's run is one epoch of ``train.max_steps``."""
    if isinstance(loader, StreamLoader):
        return cfg.train.max_steps
    return loader.sampler.usable_samples // cfg.train.batch_size


def start_epoch(loader, epoch: int, steps_done: int, global_batch: int) -> None:
    """Position ``loader`` ``steps_done`` optimizer steps into ``epoch``.

    Its workers' own seeds depend only on (seed, epoch, rank); what a sample draws is seeded by the sample itself.
    """
    if isinstance(loader, StreamLoader):
        loader.start(steps_done)
        return
    sampler = loader.sampler
    sampler.set_epoch(epoch, steps_done * global_batch)
    loader.generator.manual_seed((sampler.seed * 1_000_003 + epoch) * 1_009 + sampler.rank)


def eval_batches(num_samples: int, batch_size: int) -> list[list[int]]:
    """The evaluation set cut into fixed batches, the same however many ranks evaluate it."""
    return [list(range(start, min(start + batch_size, num_samples))) for start in range(0, num_samples, batch_size)]


def build_eval_loader(dataset: Dataset, batches: list[list[int]], cfg, device: torch.device, collate=None):
    """A loader over the given batches, in order.

    They are cut at once where the data set can (``data.resident``), else read by a DataLoader.
    """
    source = indexed_source(dataset, cfg, device, "eval", collate)
    if source is not None:
        return IndexedLoader(dataset, source, batches=batches)
    workers = 0 if cfg.data.num_workers < 0 else cfg.data.num_workers  # evaluation: no workers kept alive all run
    return DataLoader(dataset, batch_sampler=batches, **_loader_options(workers, device, collate))


def data_path(loader) -> str:
    """How batches reach the device, for the header."""
    if isinstance(loader, IndexedLoader):
        return f"on the device ({loader.source.nbytes / 2**20:,.1f} MB), batches cut at once"
    if isinstance(loader, StreamLoader):
        return f"a stream in {loader.parts} parts ({loader.num_workers} workers a process)"
    return f"through a DataLoader ({loader.num_workers} workers)"
