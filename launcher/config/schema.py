"""The configuration's keys: every engine key with its default (which gives its type), and what may change when a
run continues from its checkpoint."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

ENGINE_DEFAULTS: dict[str, Any] = {
    "recipe": "",
    # dir "" = runs/<recipe>/<name>; name "" = derived from the keys that define the run (launcher/run/directory.py).
    "run": {"dir": "", "name": ""},
    "train": {
        "epochs": 10, "batch_size": 256, "seed": 0, "log_every": 50,
        "grad_accum": 1,  # micro-batches per optimizer step; the global batch (and so the math) stays batch_size
        "clip_grad_norm": 0.0,  # 0: off
        "max_steps": 0,  # 0: no limit; else stop after this many optimizer steps (smoke runs)
        "limit_eval_batches": 0,  # 0: the whole eval set; else only its first N batches
        "amp": "none",  # none | bf16 | fp16 (fp16 with a GradScaler)
        "compile": False,  # torch.compile of the model inside DDP (TorchDynamo splits graphs at DDP buckets)
        "compile_mode": "default",  # torch.compile's mode: default, reduce-overhead (CUDA graphs), max-autotune
        "channels_last": False,  # NHWC memory format for models and image batches
        # glibc malloc keeps freed host memory (up to 1 GB) for the next step instead of faulting it in again.
        "keep_host_memory": True,
    },
    "sched": {"name": "constant", "warmup_steps": 0, "step_size": 1000, "gamma": 0.1, "min_lr_ratio": 0.0},
    "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0},
    # num_workers -1: 0 on a CPU, up to 4 per process on a GPU (engine/data.py); resident: auto (a TensorDataset on a
    # GPU, within resident_share of its memory), always, never (engine/resident.py)
    "data": {"root": "data", "num_workers": -1, "download": False, "resident": "auto", "resident_share": 0.25},
    "eval": {"batch_size": 512, "sharded": False, "only": False},
    # resume: auto = the newest good checkpoint in run.dir, if any; never; or a checkpoint's path.
    "ckpt": {"every_epochs": 1, "every_steps": 0, "keep": 3, "best_metric": "", "best_mode": "max", "resume": "auto"},
    # 30 min: long enough for rank 0 to evaluate while the others wait, short enough to end a hung job.
    # stop_check_every: steps between the ranks' agreements on a stop signal (a stop comes within twice that).
    # sync_batchnorm: BatchNorm statistics over the global batch, not each rank's share (distributed/parallel.py).
    # strategy: ddp (a full copy of the model per process) or fsdp (FSDP2: parameters, gradients and optimizer state
    # sharded over the processes; distributed/fsdp.py); reshard_after_forward: fsdp frees each block's gathered
    # parameters after its forward and gathers them again for the backward (less memory, more communication).
    "dist": {"backend": "auto", "nproc_per_node": 1, "timeout_s": 1800, "bucket_cap_mb": 25.0, "stop_check_every": 10,
             "sync_batchnorm": False, "strategy": "ddp", "reshard_after_forward": True},
    "log": {"level": "info"},
    # auto: online when W&B credentials are configured, else offline (upload later with `wandb sync`).
    "wandb": {"mode": "auto", "project": "launcher", "entity": "", "name": "", "group": "", "tags": []},
    "model": {},
}

# How a key may change when a run continues from its checkpoint (launcher/checkpoint/resume.py). A key in neither list
# defines the run (the model, the data, the seed, the optimizer's kind, the recipe's own keys): a changed one is a
# different run, refused on resume and given a directory of its own by the derived run name.
CHANGES_FREELY = ("run", "train.epochs", "train.max_steps", "train.log_every", "train.limit_eval_batches",
                  "train.compile", "train.compile_mode", "train.channels_last", "train.keep_host_memory", "data.root",
                  "data.num_workers", "data.download", "data.resident", "data.resident_share", "eval", "ckpt",
                  "dist.backend", "dist.nproc_per_node", "dist.timeout_s", "dist.bucket_cap_mb",
                  "dist.stop_check_every", "dist.sync_batchnorm", "dist.reshard_after_forward", "log", "wandb")
# dist.strategy is in neither: its checkpoints are of another kind (one file, or a folder of shards), so a run
# trains under one strategy, and the derived run name gives each strategy its own directory.
# Applied to the restored optimizer and schedule (batch size: at an epoch boundary only, where no position breaks).
APPLIED_ON_RESUME = ("optim.lr", "optim.momentum", "optim.weight_decay", "sched", "train.clip_grad_norm",
                     "train.grad_accum", "train.amp", "train.batch_size")


def _matches(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == prefix or key.startswith(prefix + ".") for prefix in prefixes)


def changes_freely(key: str) -> bool:
    return _matches(key, CHANGES_FREELY)


def applied_on_resume(key: str) -> bool:
    return _matches(key, APPLIED_ON_RESUME)


def leaves(tree: Mapping, prefix: str = "") -> Iterable[tuple[str, Any]]:
    """(dotted key, value) for every leaf of a nested mapping."""
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from leaves(value, path + ".")
        else:
            yield path, value
