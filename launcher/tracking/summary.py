"""The model summary.

torchsummary's table, taken on a real sample's shape without disturbing the model or the RNG; a table of the parameters
where torchsummary cannot run the model.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import torch
from torch import nn
from torchsummary import summary

log = logging.getLogger(__name__)



def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(all parameters, trainable parameters)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def parameter_table(model: nn.Module) -> str:
    """Every parameter's name, shape and count, and the totals torchsummary gives: a summary of any model."""
    rows = [(name, str(list(p.shape)), f"{p.numel():,}", "" if p.requires_grad else "frozen")
            for name, p in model.named_parameters()]
    header = ("Parameter", "Shape", "Param #", "")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
    line = lambda row: "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()  # noqa: E731
    total, trainable = parameter_counts(model)
    rule = "-" * max(64, sum(widths) + 6)
    return "\n".join([rule, f"{type(model).__name__}", rule, line(header), "=" * len(rule), *map(line, rows),
                      "=" * len(rule), f"Total params: {total:,}", f"Trainable params: {trainable:,}",
                      f"Non-trainable params: {total - trainable:,}", rule]) + "\n"


def model_summary(model: nn.Module, sample_input: torch.Tensor, device: torch.device) -> tuple[str | None, str]:
    """torchsummary's table for ``model`` on inputs shaped like ``sample_input`` (one sample, no batch dimension).

    Runs in eval mode (so BatchNorm statistics are untouched) and with a forked RNG (so every rank keeps the same
    random stream). Returns (None, why) when torchsummary cannot handle the model.
    """
    was_training = model.training
    model.eval()
    text = io.StringIO()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            with contextlib.redirect_stdout(text):
                summary(model, tuple(sample_input.shape), device=device.type)
    except Exception as error:  # torchsummary only knows float tensor inputs and tensor (or list) outputs
        return None, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    finally:
        model.train(was_training)
    return text.getvalue(), ""


def summarize(model: nn.Module, sample, device: torch.device) -> str:
    """The summary: torchsummary's table on the training set's first ``sample``, else the parameter table."""
    sample = sample[0] if isinstance(sample, (tuple, list)) else sample  # an (input, target) pair's input
    if isinstance(sample, torch.Tensor):
        text, problem = model_summary(model, sample, device)
        if text is None:
            log.warning("torchsummary cannot run this model (%s): summary.txt lists its parameters instead", problem)
    else:  # torchsummary makes up tensor inputs only
        text = None
        log.info("the training set's samples are %ss, which torchsummary cannot make up: summary.txt lists the "
                 "model's parameters", type(sample).__name__)
    return parameter_table(model) if text is None else text


def write_summary(text: str, run_dir: Path) -> None:
    """The summary, logged and saved as summary.txt."""
    log.info("%s", text.rstrip())
    (run_dir / "summary.txt").write_text(text)

