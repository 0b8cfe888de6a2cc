"""The baseline: the minimal DDP training loop a user writes by hand, on the launcher's benchmark workload.

    torchrun --standalone --nproc_per_node 2 bench/plain_ddp.py --arch mlp --max-steps 200

Same model, data, global batch, optimizer groups and loss as ``python -m launcher recipe=bench/workload.py``
(and, in ``bench/interleave.py``, the same bf16, channels_last and torch.compile as the launcher's config there);
nothing else: no checkpoints, no evaluation, no metrics file, no stop handling. Prints the loss every 50 steps, as
a hand-written loop does (one host read each time). ``bench/interleave.py`` runs ``plain_steps`` side by side with
the launcher's loop.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workload  # noqa: E402  (after the path: bench/ is not a package)


@dataclass
class PlainLoop:
    model: torch.nn.Module  # compiled when asked; DDP-wrapped when there are several processes
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    rank: int
    device: torch.device
    bf16: bool  # autocast the forward pass to bfloat16
    channels_last: bool
    step: int = 0


def plain_config(arch: str):
    """The workload's settings, shaped like the launcher's config (the keys the plain loop reads)."""
    return OmegaConf.create({**workload.DEFAULTS, "model": {**workload.DEFAULTS["model"], "arch": arch},
                             "train": {**workload.DEFAULTS["train"], "amp": "none", "channels_last": False,
                                       "compile": False, "compile_mode": "default"},
                             "optim": {**workload.DEFAULTS["optim"], "momentum": 0.0, "weight_decay": 0.0}})


def build_plain(train_set, cfg, device: torch.device) -> PlainLoop:
    """The loop a user writes, with what ``cfg`` asks for: the same model, optimizer, global batch, bf16,
    channels_last and torch.compile as the launcher's run of that config (fp16 is not part of the benchmarks)."""
    if cfg.train.amp not in ("none", "bf16"):
        raise SystemExit(f"the plain loop runs train.amp=none or bf16, not {cfg.train.amp}")
    distributed = dist.is_initialized() and dist.get_world_size() > 1  # as the launcher: no DDP for one process
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.manual_seed(0)
    model = workload.build_model(cfg).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    o = cfg.optim
    optimizer = torch.optim.SGD(workload.param_groups(model, cfg), lr=o.lr, momentum=o.momentum,
                                weight_decay=o.weight_decay)
    model = torch.compile(model, mode=cfg.train.compile_mode) if cfg.train.compile else model
    if distributed:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=0, drop_last=True)
    loader = DataLoader(train_set, batch_size=cfg.train.batch_size // world, sampler=sampler, drop_last=True,
                        pin_memory=device.type == "cuda")
    return PlainLoop(model, optimizer, loader, rank, device, cfg.train.amp == "bf16", cfg.train.channels_last)


def resident_batches(train_set, cfg, device: torch.device):
    """The fastest way a hand-written loop feeds a GPU: the whole data set on the device, each rank's batches taken
    by indexing a shuffled order there, epoch after epoch."""
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    images, labels = (tensor.to(device) for tensor in train_set.tensors)
    per_rank = cfg.train.batch_size // world
    generator, epoch = torch.Generator(device), 0
    while True:
        generator.manual_seed(epoch)
        order = torch.randperm(len(labels), generator=generator, device=device)[rank::world]
        for start in range(0, len(order) - per_rank + 1, per_rank):
            batch = order[start : start + per_rank]
            yield images[batch], labels[batch]
        epoch += 1


def plain_steps(loop: PlainLoop, batches, steps: int) -> None:
    """``steps`` optimizer steps on ``batches``: the loop from the user's notes, with DDP."""
    for _, (inputs, targets) in zip(range(steps), batches):
        inputs = inputs.to(loop.device, non_blocking=True)
        targets = targets.to(loop.device, non_blocking=True)
        if loop.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with torch.autocast(loop.device.type, dtype=torch.bfloat16, enabled=loop.bf16):
            loss = F.cross_entropy(loop.model(inputs), targets)
        loss.backward()
        loop.optimizer.step()
        loop.optimizer.zero_grad(set_to_none=True)
        loop.step += 1
        if loop.step % 50 == 0 and loop.rank == 0:
            print(f"step {loop.step} loss {loss.item():.4f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", choices=sorted(workload.ARCHS), default="lenet")
    parser.add_argument("--batch-size", type=int, default=256, help="global batch")
    parser.add_argument("--max-steps", type=int, default=200)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    cfg = plain_config(args.arch)
    cfg.train.batch_size = args.batch_size
    train_set, _ = workload.build_datasets(cfg)
    loop = build_plain(train_set, cfg, device)
    loop.loader.sampler.set_epoch(0)
    plain_steps(loop, iter(loop.loader), min(args.max_steps, len(loop.loader)))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
