"""Checkpoints written in the background (ckpt.async): killed inside a write, a resume is still exact; a stop during a
write publishes it."""

import os
import random
import signal
import textwrap
import time

import torch
from helpers import GPT_RECIPE, assert_identical, check_ok, descendants, launch, load_weights, start, wait_for

# Digits on a small MLP with dropout, whose param group carries a gate. A checkpoint pickles the gate in the thread that
# writes it, before any record of the file; with HOLD_WRITE=<n> the n-th write of the process holds there, says so by
# the file "writing", and goes on when the file "release" appears (or never: the test kills it). So a test acts while a
# background write is in flight by construction, however fast the machine. The gate is saved as an empty dict (what a
# weights_only load reads); a restore puts the recipe's own back.
GATED = textwrap.dedent("""
    import collections, os, time
    from pathlib import Path
    from torch import nn
    from launcher.recipes.digits import build_datasets

    DEFAULTS = {"train": {"epochs": 2, "batch_size": 64}, "optim": {"lr": 0.02, "momentum": 0.9},
                "ckpt": {"every_steps": 2}, "data": {"eval_fraction": 0.2}}

    class Gate:
        pickled = 0

        def __reduce_ex__(self, protocol):
            Gate.pickled += 1
            if Gate.pickled == int(os.environ.get("HOLD_WRITE", 0)):
                Path("writing").touch()
                deadline = time.monotonic() + 300  # a test that failed before its kill leaves no process behind
                while not Path("release").exists() and time.monotonic() < deadline:
                    time.sleep(0.01)
            return collections.OrderedDict, ()

    def build_model(cfg):
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Dropout(0.3), nn.Linear(64, 10))

    def param_groups(model, cfg):
        return [{"params": list(model.parameters()), "gate": Gate()}]
""")
COMMON = ["recipe=gated.py", "wandb.mode=disabled", "log.level=warning"]


def writes_in_flight(checkpoints) -> list[int]:
    """Steps whose checkpoint is being written (a temporary file or folder: .step_<N>.pt.<x>.tmp, .step_<N>.tmp)."""
    names = [path.name for path in checkpoints.glob(".step_*.tmp")] if checkpoints.is_dir() else []
    return [int(name.split("_")[1].split(".")[0]) for name in names]


def newest_published(checkpoints) -> int:
    steps = [int(path.name.split("_")[1].split(".")[0]) for path in checkpoints.glob("step_*")]
    return max(steps, default=0)


def kill(job) -> None:
    """SIGKILL the job, every process of it."""
    for pid in [job.pid, *descendants(job.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    job.wait(timeout=60)


def held_write(job, workdir) -> None:
    """Wait until the job's write holds at the gate (HOLD_WRITE), then let the next one hold too."""
    wait_for(lambda: (workdir / "writing").exists() or job.poll() is not None, "a held background write")
    assert job.poll() is None, f"the run ended before its write held:\n{job.output.read_text()}"
    (workdir / "writing").unlink()


def test_kills_inside_background_writes_each_resume_exactly(tmp_path):
    (tmp_path / "gated.py").write_text(GATED)
    check_ok(launch([*COMMON, "run.dir=reference"], tmp_path))  # written in the foreground: async must equal it
    checkpoints = tmp_path / "run" / "checkpoints"
    # Killed in a run's first write (nothing published yet), in a later write, and in a resumed process's write (after
    # one of its own was published): (the process's write that holds, the step it writes, the newest published one).
    for hold, writing, published in ((1, 2, 0), (3, 6, 4), (2, 8, 6)):
        job = start([*COMMON, "run.dir=run", "ckpt.async=true"], tmp_path, env={"HOLD_WRITE": str(hold)})
        held_write(job, tmp_path)
        kill(job)
        assert (writes_in_flight(checkpoints), newest_published(checkpoints)) == ([writing], published)
    finished = check_ok(launch([*COMMON, "run.dir=run", "ckpt.async=true", "log.level=info"], tmp_path))
    assert "resumed from run/checkpoints/step_000000006.pt" in finished.stdout
    assert_identical(load_weights(tmp_path / "run"), load_weights(tmp_path / "reference"))
    assert not writes_in_flight(checkpoints)  # the starts cleared what the kills left


def test_a_stop_during_a_background_write_publishes_it_and_exits_75(tmp_path):
    (tmp_path / "gated.py").write_text(GATED)
    job = start([*COMMON, "run.dir=run", "ckpt.async=true", "log.level=info"], tmp_path, env={"HOLD_WRITE": "1"})
    held_write(job, tmp_path)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert writes_in_flight(checkpoints) == [2]
    job.send_signal(signal.SIGTERM)
    (tmp_path / "release").touch()
    assert job.wait(timeout=120) == 75, job.output.read_text()
    published = checkpoints / "step_000000002.pt"
    assert published.is_file() and not writes_in_flight(checkpoints)
    assert "launcher: stopped after step" in job.output.read_text()
    torch.load(published, weights_only=True)  # whole


def kill_during_a_write(job, checkpoints, after_step: int, chance: random.Random) -> int:
    """SIGKILL the job at a random instant of a background write of a step past ``after_step``, or just after it;
    returns that step."""
    wait_for(lambda: any(step > after_step for step in writes_in_flight(checkpoints)) or job.poll() is not None,
             "a background write", 120)
    assert job.poll() is None, "the run ended before a write could be killed"
    writing = max(writes_in_flight(checkpoints))
    time.sleep(chance.uniform(0, 0.02))
    kill(job)
    return writing


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
