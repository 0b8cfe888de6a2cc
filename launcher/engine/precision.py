"""Mixed precision (train.amp) and memory format (train.channels_last) for the training step."""

from __future__ import annotations

import contextlib

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """Autocast for the forward pass and, for fp16, a GradScaler around backward and the optimizer step."""

    def __init__(self, amp: str, channels_last: bool, device: torch.device):
        self.dtype = DTYPES.get(amp)
        self.device_type = device.type
        self.channels_last = channels_last
        self.scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def to_memory_format(self, inputs: torch.Tensor) -> torch.Tensor:
        """Image batches (N, C, H, W) in channels_last when asked; anything else as it is."""
        if self.channels_last and inputs.dim() == 4:
            return inputs.contiguous(memory_format=torch.channels_last)
        return inputs

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Before clipping: the gradients at their true scale."""
        if self.scaler:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler:
            self.scaler.step(optimizer)  # skips the step when the gradients overflowed
            self.scaler.update()
        else:
            optimizer.step()
