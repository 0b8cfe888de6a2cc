"""The baseline: the minimal DDP training loop a user writes by hand, on the launcher's benchmark workload.

    torchrun --standalone --nproc_per_node 2 bench/plain_ddp.py --arch mlp --max-steps 200

Same model, data, global batch, optimizer groups and loss as ``python -m launcher recipe=bench/workload.py``;
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
    model: torch.nn.Module  # DDP-wrapped when there are several processes
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    rank: int
    step: int = 0


def build_plain(arch: str, train_set, batch_size: int) -> PlainLoop:
    distributed = dist.is_initialized() and dist.get_world_size() > 1  # as the launcher: no DDP for one process
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    cfg = OmegaConf.create({**workload.DEFAULTS, "model": {**workload.DEFAULTS["model"], "arch": arch}})
    torch.manual_seed(0)
    model = workload.build_model(cfg)
    optimizer = torch.optim.SGD(workload.param_groups(model, cfg), lr=cfg.optim.lr)
    sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=0, drop_last=True)
    loader = DataLoader(train_set, batch_size=batch_size // world, sampler=sampler, drop_last=True)
    return PlainLoop(DistributedDataParallel(model) if distributed else model, optimizer, loader, rank)


def plain_steps(loop: PlainLoop, batches, steps: int) -> None:
    """``steps`` optimizer steps on ``batches``: the loop from the user's notes, with DDP."""
    for _, (inputs, targets) in zip(range(steps), batches):
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
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        dist.init_process_group("gloo")
    cfg = OmegaConf.create(workload.DEFAULTS)
    train_set, _ = workload.build_datasets(cfg)
    loop = build_plain(args.arch, train_set, args.batch_size)
    loop.loader.sampler.set_epoch(0)
    plain_steps(loop, iter(loop.loader), min(args.max_steps, len(loop.loader)))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
