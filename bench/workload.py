"""The benchmarks' workload, as a launcher recipe: lenet or mlp on Fashion-MNIST-shaped data, or ResNet-18 (CIFAR
stem) on CIFAR-shaped data, held in memory.

    torchrun --standalone --nproc_per_node 2 -m launcher recipe=bench/workload.py model.arch=mlp

``bench/plain_ddp.py`` (the hand-written loop) uses the same module, so both train the same model on the same data
with the same optimizer groups. With ``BENCH_OUT`` set, importing it also starts ``FirstStepClock``.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import time

import torch
import torch.distributed as dist
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.data import TensorDataset

# The recipes whose models the benchmarks train, imported when used (resnet18 imports torchvision).
ARCHS = {arch: f"launcher.recipes.{arch}" for arch in ("lenet", "mlp", "resnet18")}
IMAGE_SHAPES = {"lenet": (1, 28, 28), "mlp": (1, 28, 28), "resnet18": (3, 32, 32)}  # Fashion-MNIST's, CIFAR's
# Random labels drive weights and gradients toward tiny values; denormal floats are up to 100x slower on x86, and
# whichever loop met more of them would look slower for a reason that has nothing to do with it.
torch.set_flush_denormal(True)
# 937 steps of 256 per epoch by default: room for long timed stretches (BENCH_TRAIN_SAMPLES: fewer, to start fast).
TRAIN_SAMPLES, EVAL_SAMPLES = int(os.environ.get("BENCH_TRAIN_SAMPLES", 240_000)), 1_024

DEFAULTS = {
    "train": {"epochs": 10, "batch_size": 256},
    "optim": {"name": "sgd", "lr": 0.1},
    # hidden: mlp's; num_classes, cifar_stem, pretrained: resnet18's (the CIFAR variant, for 32x32 images).
    "model": {"arch": "lenet", "hidden": 256, "classifier_lr_mult": 1.0, "num_classes": 10, "cifar_stem": True,
              "pretrained": ""},
}


def recipe_of(arch: str):
    return importlib.import_module(ARCHS[arch])


def build_model(cfg):
    return recipe_of(cfg.model.arch).build_model(cfg)


def param_groups(model, cfg):
    recipe = recipe_of(cfg.model.arch)
    return recipe.param_groups(model, cfg) if hasattr(recipe, "param_groups") else [{"params": model.parameters()}]


def build_datasets(cfg):
    """Random images and labels, fixed by a seed: speed does not depend on what the pixels say."""
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(TRAIN_SAMPLES + EVAL_SAMPLES, *IMAGE_SHAPES[cfg.model.arch], generator=generator)
    labels = torch.randint(0, 10, (TRAIN_SAMPLES + EVAL_SAMPLES,), generator=generator)
    return (TensorDataset(images[:TRAIN_SAMPLES], labels[:TRAIN_SAMPLES]),
            TensorDataset(images[TRAIN_SAMPLES:], labels[TRAIN_SAMPLES:]))


# Tensor -> Python reads: on a GPU each one waits for the device (a host sync).
HOST_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__")
COLLECTIVES = ("all_reduce", "broadcast", "barrier", "all_gather", "broadcast_object_list", "all_gather_object",
               "all_gather_into_tensor", "all_gather_single", "reduce_scatter_tensor")


class SyncCounter:
    """Counts host reads and Python-level collectives (DDP's own gradient all-reduces are not among them), per side.

    Installed by wrapping the torch functions, so it sees whatever code calls them: the launcher's and the plain
    loop's alike.
    """

    def __init__(self):
        self.side: str | None = None
        self.counts: dict[str, dict[str, int]] = {}
        self._wrap(torch.Tensor, HOST_READS, "host_reads")
        self._wrap(dist, COLLECTIVES, "collectives")

    def _wrap(self, owner, names, kind: str) -> None:
        for name in names:
            original = getattr(owner, name, None)
            if original is None:  # a name this torch does not have
                continue

            def counted(*args, _original=original, **kwargs):
                if self.side is not None:
                    side = self.counts.setdefault(self.side, {"host_reads": 0, "collectives": 0})
                    side[kind] += 1
                return _original(*args, **kwargs)

            setattr(owner, name, counted)

    @contextlib.contextmanager
    def counting(self, side: str):
        self.side = side
        try:
            yield
        finally:
            self.side = None


class FirstStepClock:
    """Writes the wall-clock time of the first optimizer step to ``out`` (rank 0), then unhooks itself."""

    def __init__(self, out: str):
        self.out = out
        self.handle = register_optimizer_step_post_hook(self.after_step)

    def after_step(self, optimizer, args, kwargs) -> None:
        self.handle.remove()
        if not dist.is_initialized() or dist.get_rank() == 0:
            with open(self.out, "w") as file:
                json.dump({"first_step_at": time.time()}, file)


if os.environ.get("BENCH_OUT"):
    FirstStepClock(os.environ["BENCH_OUT"])
