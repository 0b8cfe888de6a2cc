"""Checkpoints written in the background (ckpt.async): killed at random instants of a write, a resume is still exact;
a stop waits for the write in flight and publishes it."""

import os
import random
import signal
import textwrap
import time

import torch
from helpers import GPT_RECIPE, assert_identical, check_ok, descendants, launch, load_weights, start, wait_for

# Wide enough (2.4M parameters, a 20 MB checkpoint with momentum) that a write takes long enough to be killed in it.
WIDE = textwrap.dedent("""
    from torch import nn
    from launcher.recipes.digits import build_datasets

    DEFAULTS = {"train": {"epochs": 10, "batch_size": 64}, "optim": {"lr": 0.02, "momentum": 0.9},
                "ckpt": {"every_steps": 2}, "data": {"eval_fraction": 0.2}}

    def build_model(cfg):
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 32768), nn.ReLU(), nn.Linear(32768, 10))
""")
COMMON = ["recipe=wide.py", "wandb.mode=disabled", "log.level=warning"]


def writes_in_flight(checkpoints) -> list[int]:
    """Steps whose checkpoint is being written (a temporary file or folder: .step_<N>.pt.<x>.tmp, .step_<N>.tmp)."""
    names = [path.name for path in checkpoints.glob(".step_*.tmp")] if checkpoints.is_dir() else []
    return [int(name.split("_")[1].split(".")[0]) for name in names]


def newest_published(checkpoints) -> int:
    steps = [int(path.name.split("_")[1].split(".")[0]) for path in checkpoints.glob("step_*")]
    return max(steps, default=0)


def kill_during_a_write(job, checkpoints, after_step: int, chance: random.Random) -> int:
    """SIGKILL the job (every process of it) at a random instant of a background write of a step past ``after_step``;
    returns that step."""
    wait_for(lambda: any(step > after_step for step in writes_in_flight(checkpoints)) or job.poll() is not None,
             "a background write", 120)
    assert job.poll() is None, "the run ended before a write could be killed"
    writing = max(writes_in_flight(checkpoints))
    time.sleep(chance.uniform(0, 0.02))
    for pid in [job.pid, *descendants(job.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    job.wait(timeout=60)
    return writing


def test_twenty_kills_during_background_writes_each_resume_exactly(tmp_path):
    (tmp_path / "wide.py").write_text(WIDE)
    check_ok(launch([*COMMON, "run.dir=reference"], tmp_path))  # written in the foreground: async must equal it
    chance, checkpoints, killed, torn = random.Random(25), tmp_path / "run" / "checkpoints", 0, 0
    for _ in range(20):
        job = start([*COMMON, "run.dir=run", "ckpt.async=true"], tmp_path)
        killed = kill_during_a_write(job, checkpoints, max(killed, newest_published(checkpoints)), chance)
        torn += bool(writes_in_flight(checkpoints))  # killed before the write was renamed into place
    assert torn >= 10, f"only {torn} of 20 kills landed inside a write"
    finished = check_ok(launch([*COMMON, "run.dir=run", "ckpt.async=true", "log.level=info"], tmp_path))
    assert "resumed from run/checkpoints/step_" in finished.stdout
    assert_identical(load_weights(tmp_path / "run"), load_weights(tmp_path / "reference"))
    assert not writes_in_flight(checkpoints)  # the last start cleared what the kills left


def test_a_stop_during_a_background_write_publishes_it_and_exits_75(tmp_path):
    (tmp_path / "wide.py").write_text(WIDE)
    job = start([*COMMON, "run.dir=run", "ckpt.async=true", "log.level=info"], tmp_path)
    checkpoints = tmp_path / "run" / "checkpoints"
    wait_for(lambda: writes_in_flight(checkpoints), "a background write")
    writing = writes_in_flight(checkpoints)[0]
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=120) == 75, job.output.read_text()
    published = checkpoints / f"step_{writing:09d}.pt"
    assert published.is_file() and not writes_in_flight(checkpoints)
    assert "launcher: stopped after step" in job.output.read_text()
    torch.load(published, weights_only=True)  # whole


def test_sharded_checkpoints_written_in_the_background_resume_exactly_after_kills(tmp_path):
    (tmp_path / "gpt_small.py").write_text(GPT_RECIPE)
    args = ["recipe=gpt_small.py", "wandb.mode=disabled", "dist.strategy=fsdp", "ckpt.every_steps=3",
            "dist.nproc_per_node=2"]
    check_ok(launch([*args, "run.dir=reference"], tmp_path))
    chance, checkpoints, killed = random.Random(26), tmp_path / "run" / "checkpoints", 0
    for _ in range(2):
        job = start([*args, "run.dir=run", "ckpt.async=true"], tmp_path)
        killed = kill_during_a_write(job, checkpoints, max(killed, newest_published(checkpoints)), chance)
    check_ok(launch([*args, "run.dir=run", "ckpt.async=true"], tmp_path))
    assert_identical(load_weights(tmp_path / "run"), load_weights(tmp_path / "reference"))
