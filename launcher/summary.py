"""The model summary (torchsummary), taken on a real sample's shape without disturbing the model or the RNG."""

from __future__ import annotations

import contextlib
import io
import logging

import torch
from torch import nn
from torchsummary import summary

log = logging.getLogger(__name__)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(all parameters, trainable parameters)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def model_summary(model: nn.Module, sample_input: torch.Tensor, device: torch.device) -> str | None:
    """torchsummary's table for ``model`` on inputs shaped like ``sample_input`` (one sample, no batch dimension).

    Runs in eval mode (so BatchNorm statistics are untouched) and with a forked RNG (so every rank keeps the same
    random stream). Returns None, after a one-line warning, when torchsummary cannot handle the model.
    """
    was_training = model.training
    model.eval()
    text = io.StringIO()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            with contextlib.redirect_stdout(text):
                summary(model, tuple(sample_input.shape), device=device.type)
    except Exception as error:  # torchsummary only knows float tensor inputs and tensor (or list) outputs
        reason = f"{type(error).__name__}: {error}"
        log.warning("model summary skipped: torchsummary cannot handle this model (%s)", reason)
        return None
    finally:
        model.train(was_training)
    return text.getvalue()
