"""How the model is spread over the job's processes: one object per parallelism, chosen once from the config.

``DDP``: a whole model per process, gradients all-reduced. ``FSDP``: torch's FSDP2, each process keeping 1/N of the
parameters, gradients and optimizer state. ``FSDPWithTP``: a 2-D mesh, tensor parallel inside each block over
``dist.tp`` processes (the recipe's ``tp_plan``), FSDP across the groups of them. The object owns what differs between
them: where the model is built, how it is prepared (synchronised BatchNorm, activation checkpointing, compile, wrap or
shard), its precision, gradient sync under accumulation, clipping, which ranks read which data, how the whole state is
gathered, and which checkpoint it writes. The Trainer, the Checkpointer and evaluation ask it; they never ask which it
is. A new strategy is one class here and a name in ``dist.strategy`` (docs/design.md).

torch's FSDP and tensor parallel are imported inside the methods: importing them (and the DTensor machinery they
bring) would lengthen every process's startup (BENCHMARKS.md), and a ddp run never needs them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from launcher.distributed.batchnorm import sync_batchnorm
from launcher.distributed.env import DistEnv
from launcher.distributed.recompute import checkpoint_blocks
from launcher.errors import UserError

log = logging.getLogger(__name__)


class Strategy:
    """What every strategy shares; each overrides where it differs. Alone, one process with a whole model."""

    sharded = False  # True: state in shards (folder checkpoints), and every forward is a collective of every rank
    checkpoint_format = "file"  # rank 0 writes every rank's state in one file
    channels_last_weights = True  # train.channels_last: the model's weights too, not only the batches

    def __init__(self, cfg, dist_env: DistEnv, device: torch.device):
        self.cfg, self.dist_env, self.device = cfg, dist_env, device

    @property
    def build_device(self) -> torch.device:
        """Where the recipe's model is built (a sharded one on the CPU, moved to the device block by block)."""
        return self.device

    @property
    def autocast_amp(self) -> str:
        """``train.amp`` for autocast ('none' where the strategy casts itself)."""
        return self.cfg.train.amp

    @property
    def sync_phase(self) -> str:
        """What a synchronizing micro-step's backward waits for, in a hang's report."""
        return "gradient all-reduce" if self.dist_env.is_distributed else "backward"

    @property
    def data_env(self) -> DistEnv:
        """This rank as the data sees it: its part of each batch (rank) of how many (world size).

        Processes that compute each batch together (tensor-parallel peers) read the same part.
        """
        return self.dist_env

    @property
    def reports(self) -> bool:
        """Whether this rank's evaluation sums count (one rank of each group that reads the same batches)."""
        return True

    def prepare(self, model: nn.Module, recipe) -> nn.Module:
        """Before the optimizer: the model as its parameters will be trained (the same parameters, or their shards)."""
        if self.cfg.train.channels_last and self.channels_last_weights:
            model = model.to(memory_format=torch.channels_last)
        if self.cfg.dist.sync_batchnorm and self.dist_env.is_distributed:
            model = sync_batchnorm(model, self.device)
        self._recompute(recipe.blocks(model))
        return model

    def wrap(self, model: nn.Module) -> nn.Module:
        """After the checkpoint is restored: what each step calls."""
        return model

    def gradient_sync(self, trained: nn.Module, sync: bool):
        """Around a micro-step's forward and backward: gradients reduced only on the last of them (``sync``)."""
        return contextlib.nullcontext()

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Clip the gradients' total norm to ``max_norm``; the norm before clipping."""
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def full_state(self, model: nn.Module) -> dict:
        """Collective: the whole model's state_dict on rank 0 (other ranks: whatever they hold, unused)."""
        return model.state_dict()

    def _recompute(self, blocks: list[nn.Module]) -> None:
        mode = self.cfg.train.activation_checkpointing
        if mode == "off":
            return
        if not blocks:
            raise UserError(f"train.activation_checkpointing={mode} needs the model's repeated blocks: the recipe's "
                            "blocks(model) returns none, and the model has no nn.ModuleList (or nn.Sequential of "
                            "alike modules) to find them in", same_on_all_ranks=True)
        wrapped = checkpoint_blocks(blocks, mode)
        if self.dist_env.is_main:
            log.info("activation checkpointing (%s): %d of %d blocks recompute their forward in backward", mode,
                     wrapped, len(blocks))


class DDP(Strategy):
    """``dist.strategy=ddp``: the whole model on every process, its gradients all-reduced (DistributedDataParallel).

    torch.compile goes inside DDP: DDP's forward then runs eagerly and marks itself active, so TorchDynamo's
    DDPOptimizer splits the compiled graph at DDP's bucket boundaries and each bucket's all-reduce starts while the
    rest of the backward pass runs. Compiling the DDP wrapper instead (the order PyTorch's DDP notes show) left the
    model eager with torch 2.14: Dynamo breaks the graph at DDP's ``_inside_ddp_forward`` and runs what is inside it
    uncompiled. tests/e2e/test_compile.py profiles the overlap.
    """

    def wrap(self, model: nn.Module) -> nn.Module:
        compiled = torch.compile(model, mode=self.cfg.train.compile_mode) if self.cfg.train.compile else model
        if not self.dist_env.is_distributed:
            return compiled
        return DistributedDataParallel(compiled, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                       bucket_cap_mb=self.cfg.dist.bucket_cap_mb)

    def gradient_sync(self, trained: nn.Module, sync: bool):
        skip = not sync and isinstance(trained, DistributedDataParallel)
        return trained.no_sync() if skip else contextlib.nullcontext()


class FSDP(Strategy):
    """``dist.strategy=fsdp``: each of the recipe's blocks sharded on its own (FSDP2's ``fully_shard``), then the root.

    Only one block's weights are whole at a time. The model is built on the CPU and each block moved to the device as
    it is sharded, so the whole model is never there at once. ``train.amp=bf16`` computes in bf16 with the gradients
    reduced in fp32, and the model's output in fp32 (so the loss is, as under autocast; the blocks' outputs stay bf16
    for the next block). ``train.compile`` compiles each block before it is sharded, as torchtitan does: FSDP's hooks
    stay outside the compiled code.
    """

    sharded = True
    checkpoint_format = "folder"  # every rank writes its shards (torch.distributed.checkpoint)
    # fully_shard takes contiguous parameters only; the batches are still channels_last, for which cuDNN picks its
    # NHWC kernels (converting each convolution's weight as it runs).
    channels_last_weights = False
    casts_parameters = False  # train.amp=bf16 through the MixedPrecisionPolicy (bf16 weights), decided in prepare

    @property
    def build_device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def autocast_amp(self) -> str:
        return "none" if self.casts_parameters else self.cfg.train.amp  # else the MixedPrecisionPolicy casts

    @property
    def sync_phase(self) -> str:
        return "gradient reduce-scatter"

    def prepare(self, model: nn.Module, recipe) -> nn.Module:
        _refuse_rank_local_batchnorm(model, self.cfg, self.dist_env)
        model = super().prepare(model, recipe)
        blocks = recipe.blocks(model)
        if self.dist_env.is_main:
            log.info("fsdp: %d blocks sharded one by one (%s), then the root%s", len(blocks),
                     type(blocks[0]).__name__ if blocks else "none found: the whole model is one unit",
                     self._describe_mesh())
        self._parallelize(model, recipe)
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # BatchNorm computes with its running statistics, which stay fp32: bf16 weights beside them fail ("expected
        # scalar type BFloat16 but found Float"). A model with BatchNorm keeps fp32 weights and computes under autocast.
        self.casts_parameters = self.cfg.train.amp == "bf16" and not _has_batchnorm(model)
        bf16 = self.casts_parameters
        inside = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
        outside = MixedPrecisionPolicy(torch.bfloat16, torch.float32, output_dtype=torch.float32) if bf16 else None
        for block in blocks or [model]:
            if self.cfg.train.compile:
                block.compile(mode=self.cfg.train.compile_mode)
        mesh = self._data_mesh()
        for block in blocks:
            fully_shard(block, mesh=mesh, reshard_after_forward=self.cfg.dist.reshard_after_forward,
                        mp_policy=inside or MixedPrecisionPolicy())
        # The root's parameters (embeddings, the output layer) are needed again at once by the backward pass.
        return fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=outside or MixedPrecisionPolicy())

    def gradient_sync(self, trained: nn.Module, sync: bool):
        if self.cfg.train.grad_accum > 1:
            trained.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def full_state(self, model: nn.Module) -> dict:
        """Collective: gathered one tensor at a time into host memory on rank 0 (never the whole model on one GPU)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _data_mesh(self):
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(self.device.type, (self.dist_env.world_size,))

    def _parallelize(self, model: nn.Module, recipe) -> None:
        pass

    def _describe_mesh(self) -> str:
        return ""


class FSDPWithTP(FSDP):
    """``dist.strategy=fsdp dist.tp=N``: a 2-D mesh of (data parallel) x (tensor parallel) processes.

    The recipe's ``tp_plan(model)`` splits each block's matrices over the N processes of a tensor-parallel group
    (``ColwiseParallel``, ``RowwiseParallel``: torch's ``parallelize_module``), which compute each batch together and
    so read the same data; FSDP shards over the data-parallel groups. Ranks r and r+1 of a node are tensor-parallel
    peers (the inner dimension: the fastest links). The parameters the plan does not split (embeddings, norms, the
    output layer) are sharded by FSDP alone, on a mesh of their own: clipping sums the norms of both kinds.
    """

    def __init__(self, cfg, dist_env: DistEnv, device: torch.device):
        super().__init__(cfg, dist_env, device)
        self.tp = cfg.dist.tp
        self._mesh = None

    @property
    def sync_phase(self) -> str:
        return "gradient reduce-scatter (data parallel) and the tensor-parallel collectives"

    @property
    def data_env(self) -> DistEnv:
        return dataclasses.replace(self.dist_env, rank=self.dist_env.rank // self.tp,
                                   world_size=self.dist_env.world_size // self.tp)

    @property
    def reports(self) -> bool:
        return self.dist_env.rank % self.tp == 0

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Clip by the norm of every gradient, over the meshes they are spread on (torch's own takes one mesh)."""
        on_mesh: dict = {}
        for parameter in model.parameters():
            if parameter.grad is not None:
                on_mesh.setdefault(id(getattr(parameter.grad, "device_mesh", None)), []).append(parameter)
        squares = [torch.nn.utils.get_total_norm([p.grad for p in group]).full_tensor() ** 2
                   for group in on_mesh.values()]
        total = torch.stack(squares).sum().sqrt()
        for group in on_mesh.values():
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
        return total

    def _mesh2d(self):
        if self._mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            shape = (self.dist_env.world_size // self.tp, self.tp)
            self._mesh = init_device_mesh(self.device.type, shape, mesh_dim_names=("dp", "tp"))
            # DTensor warns that a reduction over both dimensions takes two collectives: here, the gradients' norm
            # and model.pt's gathering, one small, the other once a run.
            logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
        return self._mesh

    def _data_mesh(self):
        return self._mesh2d()["dp"]

    def _parallelize(self, model: nn.Module, recipe) -> None:
        from torch.distributed.tensor.parallel import parallelize_module

        plan = recipe.tp_plan(model, self.cfg)
        parallelize_module(model, self._mesh2d()["tp"], plan)

    def _describe_mesh(self) -> str:
        dp, tp = self.dist_env.world_size // self.tp, self.tp
        return f", on a {dp} x {tp} mesh (data parallel x tensor parallel)"


def strategy_for(cfg, dist_env: DistEnv, device: torch.device) -> Strategy:
    """The run's strategy, from ``dist.strategy`` and ``dist.tp``."""
    if cfg.dist.strategy == "fsdp":
        return (FSDPWithTP if cfg.dist.tp > 1 else FSDP)(cfg, dist_env, device)
    return DDP(cfg, dist_env, device)


def is_sharded(cfg) -> bool:
    """Whether the run's model state is sharded (``dist.strategy=fsdp``), asked of the config before any process group.

    Its checkpoints are folders, and it needs a process group even alone.
    """
    return cfg.dist.strategy == "fsdp"


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks, where the recipe names none (a transformer's layers).

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


def _refuse_rank_local_batchnorm(model: nn.Module, cfg, dist_env: DistEnv) -> None:
    """Refuse BatchNorm that is not synchronised when FSDP runs on several processes.

    FSDP keeps each rank's BatchNorm running statistics apart (DDP copies rank 0's into every rank at each forward): the
    checkpoint would hold one rank's, and evaluation on every rank would differ by rank. Synchronised BatchNorm computes
    them from the global batch, the same on every rank.
    """
    if not dist_env.is_distributed or cfg.dist.sync_batchnorm:
        return
    if _has_batchnorm(model):
        raise UserError("dist.strategy=fsdp with BatchNorm layers needs dist.sync_batchnorm=true: FSDP keeps each "
                        "rank's running statistics apart, where DDP copies rank 0's to every rank",
                        same_on_all_ranks=True)


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in model.modules())
