"""Activation checkpointing on the gpt recipe: the activation memory each ``train.activation_checkpointing`` mode
keeps, and what it costs in step time, side by side in one process.

    python bench/activations.py [--rounds 5] [--steps 4] [gpt's model.* and train.* overrides]

Each mode's model is the recipe's, its blocks wrapped as the launcher wraps them (distributed/recompute.py), trained
by AdamW on the recipe's own batches. Activation memory is what a forward leaves allocated for the backward (the
saved activations and the logits): on the CPU the net allocation of the forward in torch.profiler's memory view, on
a GPU ``torch.cuda.max_memory_allocated`` over a step less what was allocated before it. Step time: the modes' chunks
of ``--steps`` steps in rotating order over ``--rounds`` rounds (a shared machine's drift cancels), the median
chunk; ``off`` runs twice, the second its A/A control. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from launcher.cli.main import load_validated
from launcher.distributed.env import DistEnv
from launcher.distributed.recompute import checkpoint_blocks

MODES = ("off", "off (A/A)", "full", "2", "op")


def built(mode: str, recipe, cfg, device: torch.device):
    """(model, optimizer) for ``mode``, the same initial weights for every mode."""
    torch.manual_seed(0)
    model = recipe.build_model(cfg).to(device)
    checkpoint_blocks(recipe.blocks(model), mode.split()[0])
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def activation_bytes(model, recipe, batch, device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        recipe.step(model, batch)[0].backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiled:
        with record_function("forward"):
            loss, _ = recipe.step(model, batch)
        loss.backward()
    return next(event.cpu_memory_usage for event in profiled.key_averages() if event.key == "forward")


def timed_steps(model, optimizer, recipe, batch, steps: int, device: torch.device) -> float:
    """Seconds per step over ``steps`` steps (forward, backward, optimizer step)."""
    began = time.perf_counter()
    for _ in range(steps):
        recipe.step(model, batch)[0].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - began) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    args, overrides = parser.parse_known_args()
    _, recipe, cfg = load_validated(["recipe=gpt", *overrides], DistEnv())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train, _ = recipe.build_datasets(cfg)
    batch = {key: value.to(device) for key, value in train.take(torch.arange(cfg.train.batch_size)).items()}
    runs = {mode: built(mode, recipe, cfg, device) for mode in MODES}
    memory = {mode: activation_bytes(model, recipe, batch, device) for mode, (model, _) in runs.items()}
    chunks: dict[str, list[float]] = {mode: [] for mode in MODES}
    for round_ in range(args.rounds + 1):  # the first round warms up (allocator, caches) and is dropped
        order = MODES[round_ % len(MODES):] + MODES[:round_ % len(MODES)]
        for mode in order:
            seconds = timed_steps(*runs[mode], recipe, batch, args.steps, device)
            if round_:
                chunks[mode].append(seconds)
    step_s = {mode: statistics.median(times) for mode, times in chunks.items()}
    parameters = sum(p.numel() for p in runs["off"][0].parameters())
    print(json.dumps({"device": str(device), "parameters": parameters, "batch": cfg.train.batch_size,
                      "context": cfg.model.context, "overrides": overrides,
                      "modes": {mode: {"activation_bytes": memory[mode], "step_s": step_s[mode],
                                       "memory_vs_off": memory[mode] / memory["off"],
                                       "time_vs_off": step_s[mode] / step_s["off"]} for mode in MODES}}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
