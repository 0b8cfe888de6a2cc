"""Per-rank memory of the model's training state under dist.strategy=ddp and fsdp: parameters, gradients and
optimizer state each process holds, after real optimizer steps of the launcher's own Trainer (``Trainer.build``,
``train_steps``) on the gpt recipe.

    torchrun --standalone --nproc_per_node 2 bench/memory.py [gpt's model.* and train.* overrides]

Counted are the bytes of the tensors each rank keeps between steps (a sharded tensor's local shard), which is what
FSDP divides; gradients are counted after a backward, before the step frees them. On a GPU it also reports the
peak memory allocated (``torch.cuda.max_memory_allocated``), which adds activations and gathered blocks. Prints
one JSON line per strategy (the ranks' numbers, rank 0's first).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from launcher.cli.main import exit_process, load_validated
from launcher.distributed.env import DistEnv, device_for
from launcher.distributed.group import destroy_process_group, init_process_group
from launcher.distributed.stop import StopSignals
from launcher.engine.batches import to_device
from launcher.engine.data import start_epoch
from launcher.engine.trainer import Trainer
from launcher.tracking.terminal import setup_logging

STEPS = 3


def local_bytes(tensors) -> int:
    """What ``tensors`` take on this rank (of a sharded one, its shard)."""
    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    return sum(t.numel() * t.element_size() for t in local)


def measure(strategy: str, overrides: list[str], dist_env: DistEnv) -> dict:
    """This rank's bytes of parameters, gradients and optimizer state under ``strategy``."""
    run_dir = Path(tempfile.gettempdir()) / f"launcher-memory-{strategy}-{dist_env.job_id}"
    _, recipe, cfg = load_validated(["recipe=gpt", f"run.dir={run_dir}", "wandb.mode=disabled", "log.level=warning",
                                     f"dist.strategy={strategy}", "ckpt.every_epochs=0", *overrides], dist_env)
    device = device_for(dist_env, cfg.dist.backend)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer = Trainer.build(cfg, recipe, dist_env, device, StopSignals(dist_env))
    start_epoch(trainer.train_loader, 1, 0, cfg.train.batch_size)
    batches = iter(trainer.train_loader)
    trainer.train_steps(batches, until_step=STEPS)  # the optimizer state exists from the first step on
    params = list(trainer.model.parameters())
    trainer._micro_step(to_device(next(batches), device, trainer.precision.to_memory_format), 1, sync=True)
    gradients = local_bytes(p.grad for p in params if p.grad is not None)
    optimizer_state = local_bytes(value for state in trainer.optimizer.state.values() for value in state.values()
                                  if isinstance(value, torch.Tensor) and value.dim() > 0)
    trainer.close("finished")
    if dist_env.is_main:
        shutil.rmtree(run_dir, ignore_errors=True)
    result = {"parameters": local_bytes(params), "gradients": gradients, "optimizer_state": optimizer_state,
              "model_parameters": sum(p.numel() for p in params)}
    if device.type == "cuda":
        result["peak_allocated"] = torch.cuda.max_memory_allocated(device)
    return result


def main() -> None:
    overrides = sys.argv[1:]
    dist_env = DistEnv.from_environ()
    setup_logging(dist_env, "warning")
    init_process_group(dist_env, "auto", device_for(dist_env, "auto"), 600, even_alone=True)
    for strategy in ("ddp", "fsdp"):
        mine = measure(strategy, overrides, dist_env)
        ranks = [None] * dist_env.world_size
        dist.all_gather_object(ranks, mine)
        if dist_env.is_main:
            print(json.dumps({"strategy": strategy, "world_size": dist_env.world_size, "ranks": ranks,
                              "overrides": overrides}), flush=True)
    dist.barrier()  # leave together (a rank tearing down while another still talks can abort in gloo)
    destroy_process_group()


if __name__ == "__main__":
    main()
    exit_process(0)  # its gloo group outlives destroy_process_group: ended as a launcher worker is
