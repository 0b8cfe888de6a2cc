"""``dist.sync_batchnorm``: BatchNorm layers whose training statistics are those of the global batch.

On GPUs, torch's own SyncBatchNorm (fused CUDA kernels). It runs nowhere else (and DDP refuses it on CPU modules),
so on other devices (the CPU, with gloo) each BatchNorm layer computes the same statistics here instead:
per-channel sums, sums of squares and counts, all-reduced through torch.distributed.nn's differentiable
all_reduce, so the backward pass all-reduces their gradients too.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.nn.functional import all_reduce


class _GlobalStatistics:
    """In training, normalise with the statistics of every rank's batch together; in evaluation, as BatchNorm."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(input)
        self._check_input_dim(input)
        channels = input.shape[1]
        values = input.transpose(0, 1).reshape(channels, -1)  # (C, N x spatial)
        local = torch.cat([values.sum(1), (values * values).sum(1),
                           torch.full((1,), values.shape[1], dtype=input.dtype, device=input.device)])
        total = all_reduce(local)
        count = total[-1]
        mean = total[:channels] / count
        var = total[channels : 2 * channels] / count - mean * mean
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach() * count / (count - 1))
        shape = (1, channels) + (1,) * (input.dim() - 2)
        output = (input - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return output * self.weight.view(shape) + self.bias.view(shape) if self.affine else output

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        factor = 1.0 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean, factor)
        self.running_var.lerp_(unbiased_var, factor)


class GlobalBatchNorm1d(_GlobalStatistics, nn.BatchNorm1d):
    pass


class GlobalBatchNorm2d(_GlobalStatistics, nn.BatchNorm2d):
    pass


class GlobalBatchNorm3d(_GlobalStatistics, nn.BatchNorm3d):
    pass


_GLOBAL = {nn.BatchNorm1d: GlobalBatchNorm1d, nn.BatchNorm2d: GlobalBatchNorm2d, nn.BatchNorm3d: GlobalBatchNorm3d}


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` with every BatchNorm layer synchronised over the job's ranks.

    Its parameters and buffers stay the same tensors (the optimizer and the unwrapped model see them; state_dict keys do
    not change).
    """
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for module in model.modules():
        if type(module) in _GLOBAL:
            module.__class__ = _GLOBAL[type(module)]
    return model
