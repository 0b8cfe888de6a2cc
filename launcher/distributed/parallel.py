"""What trains on each rank: the model, compiled if asked, inside DistributedDataParallel when there are several."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from launcher.distributed.batchnorm import sync_batchnorm
from launcher.distributed.env import DistEnv


def wrap_model(model: nn.Module, cfg, dist_env: DistEnv, device: torch.device) -> nn.Module:
    """``model`` with synchronised BatchNorm, compiled, and wrapped in DDP, each where it applies.

    BatchNorm is synchronised with ``dist.sync_batchnorm`` and several processes, the model compiled with
    ``train.compile``, and wrapped in DDP with several processes. The result shares ``model``'s parameters and buffers.

    torch.compile goes inside DDP: DDP's forward then runs eagerly and marks itself active, so TorchDynamo's
    DDPOptimizer splits the compiled graph at DDP's bucket boundaries and each bucket's all-reduce starts while
    the rest of the backward pass runs. Compiling the DDP wrapper instead (the order PyTorch's DDP notes show)
    left the model eager with torch 2.14: Dynamo breaks the graph at DDP's ``_inside_ddp_forward`` and runs what
    is inside it uncompiled. tests/test_compile.py profiles the overlap.
    """
    if cfg.dist.sync_batchnorm and dist_env.is_distributed:
        model = sync_batchnorm(model, device)
    compiled = torch.compile(model, mode=cfg.train.compile_mode) if cfg.train.compile else model
    if not dist_env.is_distributed:
        return compiled
    return DistributedDataParallel(compiled, device_ids=[device.index] if device.type == "cuda" else None,
                                   bucket_cap_mb=cfg.dist.bucket_cap_mb)
