"""``dist.strategy=fsdp``: the model sharded over the processes with torch's FSDP2 (``fully_shard``).

Each process keeps 1/world of the parameters, gradients and optimizer state, and gathers a block's parameters only while
the block computes: a model that does not fit one GPU trains on several.

torch's FSDP is imported inside the functions: importing it (and the DTensor machinery it brings) would lengthen
every process's startup (BENCHMARKS.md), and a ddp run never needs it.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from launcher.distributed.batchnorm import sync_batchnorm
from launcher.distributed.env import DistEnv
from launcher.errors import UserError

log = logging.getLogger(__name__)


def is_sharded(cfg) -> bool:
    """Whether the run's model is sharded (``dist.strategy=fsdp``)."""
    return cfg.dist.strategy == "fsdp"


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The default blocks to shard one by one (a transformer's layers).

    They are the children of the model's largest (by parameters) ``nn.ModuleList``, or ``nn.Sequential`` of two or more
    modules of one class; none if it has neither.
    """

    def alike(container: nn.Module) -> bool:
        if isinstance(container, nn.ModuleList):
            return len(container) > 0
        return isinstance(container, nn.Sequential) and len(container) > 1 and len({type(c) for c in container}) == 1

    lists = [module for module in model.modules() if alike(module)]
    if not lists:
        return []
    largest = max(lists, key=lambda container: sum(p.numel() for p in container.parameters()))
    return list(largest)


def refuse_rank_local_batchnorm(model: nn.Module, cfg, dist_env: DistEnv) -> None:
    """Refuse BatchNorm that is not synchronised when FSDP runs on several processes.

    FSDP keeps each rank's BatchNorm running statistics apart (DDP copies rank 0's into every rank at each forward): the
    checkpoint would hold one rank's, and evaluation on every rank would differ by rank. Synchronised BatchNorm computes
    them from the global batch, the same on every rank.
    """
    if not dist_env.is_distributed or cfg.dist.sync_batchnorm:
        return
    if any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in model.modules()):
        raise UserError("dist.strategy=fsdp with BatchNorm layers needs dist.sync_batchnorm=true: FSDP keeps each "
                        "rank's running statistics apart, where DDP copies rank 0's to every rank",
                        same_on_all_ranks=True)


def shard_model(model: nn.Module, cfg, recipe, dist_env: DistEnv, device: torch.device) -> nn.Module:
    """``model`` (on the CPU) sharded over the job's processes onto ``device``.

    Each of the recipe's ``fsdp_blocks`` is sharded on its own, then the root with the rest. Returns the same module,
    now an ``FSDPModule``.

    Sharding moves one block at a time to the device, so the whole model is never there at once. ``train.amp=bf16``
    computes in bf16 with the gradients reduced in fp32, and the model's output in fp32 (so the loss is, as under
    autocast; the blocks' outputs stay bf16 for the next block). ``train.compile`` compiles each block before it is
    sharded, as torchtitan does: FSDP's hooks stay outside the compiled code.
    """
    if cfg.dist.sync_batchnorm and dist_env.is_distributed:
        model = sync_batchnorm(model, device)
    blocks = recipe.fsdp_blocks(model)
    if dist_env.is_main:
        log.info("fsdp: %d blocks sharded one by one (%s), then the root", len(blocks),
                 type(blocks[0]).__name__ if blocks else "none found: the whole model is one unit")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist_env.world_size,))
    bf16 = cfg.train.amp == "bf16"
    inside = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    outside = MixedPrecisionPolicy(torch.bfloat16, torch.float32, output_dtype=torch.float32) if bf16 else None
    for block in blocks or [model]:
        if cfg.train.compile:
            block.compile(mode=cfg.train.compile_mode)
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=cfg.dist.reshard_after_forward,
                    mp_policy=inside or MixedPrecisionPolicy())
    # The root's parameters (embeddings, the output layer) are needed again at once by the backward pass.
    return fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=outside or MixedPrecisionPolicy())


def full_model_state(model: nn.Module) -> dict:
    """Collective: the sharded model's whole state_dict on rank 0; an empty dict on the other ranks.

    It is gathered one tensor at a time into host memory (never the whole model on one GPU).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
