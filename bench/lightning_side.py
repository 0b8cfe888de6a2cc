"""Lightning's ``Trainer`` as a peer, on the launcher's benchmark workload: same model, data, global batch, optimizer
groups, loss, bf16, channels_last and torch.compile. Run under torchrun like the other sides (Lightning picks torchrun's
environment up and runs DDP in these processes); prints one JSON object on rank 0: steps/s over the steps after
the warmup.

    torchrun --standalone --nproc_per_node 2 bench/lightning_side.py --arch mlp --steps 810 --warmup 100 \\
        [train.amp=bf16 train.channels_last=true train.compile=true]

Needs the ``bench`` extra (``pip install -e ".[dev,bench]"``). It runs in processes of its own, not interleaved with
the launcher's loop: overhead.py runs it after each interleaved run and reads it against that run's plain loop.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workload  # noqa: E402
from plain_ddp import plain_config  # noqa: E402


class Workload(L.LightningModule):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        torch.manual_seed(0)
        self.model = workload.build_model(cfg)
        if cfg.train.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if cfg.train.compile:
            self.model = torch.compile(self.model, mode=cfg.train.compile_mode)

    def training_step(self, batch, batch_index):
        inputs, targets = batch
        if self.cfg.train.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        return F.cross_entropy(self.model(inputs), targets)

    def configure_optimizers(self):
        return torch.optim.SGD(workload.param_groups(self.model, self.cfg), lr=self.cfg.optim.lr)


class StepClock(L.Callback):
    """Wall time from the end of the warmup's last step to the end of the last step (GPU work included)."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, None, None

    def _now(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_index):
        if trainer.global_step == self.warmup:
            trainer.strategy.barrier()
            self.start = self._now()
        self.end = self._now()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", choices=sorted(workload.ARCHS), default="lenet")
    parser.add_argument("--steps", type=int, default=810, help="timed steps")
    parser.add_argument("--warmup", type=int, default=100)
    args, overrides = parser.parse_known_args()
    cfg = plain_config(args.arch)
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    world = int(os.environ.get("WORLD_SIZE", 1))
    train_set, _ = workload.build_datasets(cfg)
    cuda = torch.cuda.is_available()
    loader = DataLoader(train_set, batch_size=cfg.train.batch_size // world, shuffle=True, drop_last=True,
                        pin_memory=cuda)
    clock = StepClock(args.warmup)
    trainer = L.Trainer(accelerator="gpu" if cuda else "cpu", devices=int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
                        strategy="ddp" if world > 1 else "auto",
                        precision="bf16-mixed" if cfg.train.amp == "bf16" else "32-true",
                        max_steps=args.warmup + args.steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[clock])
    trainer.fit(Workload(cfg), loader)
    if trainer.global_rank == 0:
        print(json.dumps({"arch": args.arch, "procs": world, "lightning": L.__version__,
                          "lightning_steps_per_s": args.steps / (clock.end - clock.start)}))


if __name__ == "__main__":
    main()
