"""What the tests share: run the real launcher in real processes and read what it leaves (metrics, weights, wandb
runs, errors); write real Fashion-MNIST IDX files; the digits recipe with test stand-ins for a cluster's accidents."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def launcher_command(args: list[str], nproc: int | None = None, torchrun_args: tuple = (), wrapper: tuple = ()):
    """`torchrun --standalone --nproc_per_node N -m launcher ARGS` (nproc given) or `python -m launcher ARGS`, run
    by ``wrapper`` (e.g. `unshare ...`) if given."""
    if nproc:
        command = [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", *torchrun_args, "-m", "launcher", *args]
    else:
        command = [sys.executable, "-m", "launcher", *args]
    return [*wrapper, *command]


WANDB_ON = {"WANDB_MODE": None}  # for launcher_environ: wandb.mode=auto logs offline (no credentials)


def launcher_environ(env: dict | None) -> dict:
    """This process's environment with ``env`` over it (None: unset), one thread, no W&B credentials, and wandb off
    (WANDB_MODE=disabled, which wandb.mode=auto honours): a wandb run is a process of its own, about a second of CPU
    per launch that a test not about it need not pay. ``WANDB_ON`` in ``env`` turns it on: wandb.mode=auto then logs
    offline, never to a server."""
    merged = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_API_KEY": None, "WANDB_MODE": "disabled", **(env or {})}
    return {key: value for key, value in merged.items() if value is not None}


def launch(args: list[str], cwd: Path, nproc: int | None = None, env: dict | None = None, timeout: float = 300,
           torchrun_args: tuple = (), wrapper: tuple = ()):
    """Run ``launcher_command`` to its end."""
    return subprocess.run(launcher_command(args, nproc, torchrun_args, wrapper), cwd=cwd, env=launcher_environ(env),
                          capture_output=True, text=True, timeout=timeout)


def check_ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\nSTDOUT:\n{result.stdout}\nSTDERR:\n{result.stderr}"
    return result


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def epoch_records(run_dir: Path) -> list[dict]:
    return [record for record in read_metrics(run_dir) if "time/epoch_s" in record]


def load_weights(run_dir: Path | str) -> dict:
    return torch.load(Path(run_dir) / "model.pt", weights_only=True)


def write_idx(folder: Path, split: str, images: torch.Tensor, labels: torch.Tensor) -> None:
    """uint8 images (N, 28, 28) and labels (N,) in the IDX format Fashion-MNIST ships in (big-endian header)."""
    folder.mkdir(parents=True, exist_ok=True)
    count = len(labels)
    header = lambda magic, *dims: b"".join(x.to_bytes(4, "big") for x in (magic, count, *dims))  # noqa: E731
    (folder / f"{split}-images-idx3-ubyte").write_bytes(header(2051, 28, 28) + images.numpy().tobytes())
    (folder / f"{split}-labels-idx1-ubyte").write_bytes(header(2049) + labels.numpy().tobytes())


def synthetic_fashion(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable stand-ins for Fashion-MNIST: class k is a bright bar at row 2k + 4, on noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (count,), generator=generator, dtype=torch.uint8)
    images = torch.randint(0, 60, (count, 28, 28), generator=generator, dtype=torch.uint8)
    for i, label in enumerate(labels.tolist()):
        images[i, 2 * label + 4, 4:24] = 250
    return images, labels


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def start(args: list[str], cwd: Path, nproc: int | None = None, env: dict | None = None,
          torchrun_args: tuple = (), wrapper: tuple = ()) -> subprocess.Popen:
    """What ``launch`` runs, started in the background (its output in the file ``.output`` names, in ``cwd``)."""
    output = cwd / f"job-{len(list(cwd.glob('job-*.out')))}.out"
    process = subprocess.Popen(launcher_command(args, nproc, torchrun_args, wrapper), cwd=cwd,
                               env=launcher_environ(env), stdout=output.open("w"), stderr=subprocess.STDOUT, text=True)
    process.output = output  # where its stdout and stderr go
    return process


def wait_for(condition, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# The test recipes' stand-in for a signal from a cluster: INTERRUPT="<rank>:<step>:<signal>" sends the signal to
# that rank during that step (its n-th loss), once (a marker file remembers).
INTERRUPT_ON_CALL = """
    import os, signal
    from pathlib import Path

    MARKER = Path("interrupted.marker")
    calls = 0

    def interrupt_on_call():
        global calls
        calls += 1
        if os.environ.get("INTERRUPT") and not MARKER.exists():
            rank, call, name = os.environ["INTERRUPT"].split(":")
            if rank == os.environ.get("RANK", "0") and calls == int(call):
                MARKER.touch()
                os.kill(os.getpid(), getattr(signal, name))
"""

# Digits with dropout (so the random streams matter), and test stand-ins for the accidents of real clusters:
# INTERRUPT as above, KILL_IN_SAVE=<n> kills rank 0 while it writes its n-th checkpoint, once; STEP_SLEEP=<s> slows
# each step down, so a test can act on a job while it runs.
RECIPE = textwrap.dedent(INTERRUPT_ON_CALL + """
    import time
    import torch.nn.functional as F
    from torch import nn
    from launcher.recipes.digits import build_datasets

    DEFAULTS = {"train": {"epochs": 3, "batch_size": 64, "log_every": 10}, "optim": {"lr": 0.05, "momentum": 0.9},
                "data": {"eval_fraction": 0.2}}

    class KillWhenPickled:
        def __reduce_ex__(self, protocol):
            os.kill(os.getpid(), signal.SIGKILL)

    def build_model(cfg):
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Dropout(0.3), nn.Linear(64, 10))
        if os.environ.get("KILL_IN_SAVE") and os.environ["RANK"] == "0" and not MARKER.exists():
            saves = []
            def kill_in_nth_save(module, state_dict, prefix, metadata):
                saves.append(1)
                if len(saves) == int(os.environ["KILL_IN_SAVE"]):
                    MARKER.touch()
                    state_dict["zz_kill"] = KillWhenPickled()
            model._register_state_dict_hook(kill_in_nth_save)
        return model

    def loss(outputs, targets):
        time.sleep(float(os.environ.get("STEP_SLEEP", 0)))
        interrupt_on_call()
        return F.cross_entropy(outputs, targets)
""")


ARGS = ["recipe=interruptible.py", "ckpt.every_steps=5"]

# The gpt recipe made small (2 blocks of width 32, 31 steps an epoch), with INTERRUPT as above (counted in steps),
# and KILL_IN_SHARD_SAVE=<n>: rank 0 is killed in the n-th sharded checkpoint (dist.strategy=fsdp) of a process
# (one started after the INTERRUPT's, if there is one), once, after every rank wrote its shards and before
# torch.distributed.checkpoint's .metadata.
GPT_RECIPE = textwrap.dedent(INTERRUPT_ON_CALL + """
    from torch.distributed.checkpoint.filesystem import FileSystemWriter
    from launcher.recipes import gpt
    from launcher.recipes.gpt import (blocks, build_datasets, build_model, metrics, param_groups, tokens_per_sample,
                                      tp_plan)

    DEFAULTS = {**gpt.DEFAULTS, "train": {**gpt.DEFAULTS["train"], "epochs": 2, "log_every": 5},
                "data": {"train_bytes": 65_000, "eval_bytes": 16_000},
                "model": {**gpt.DEFAULTS["model"], "layers": 2, "width": 32}}

    TORN = Path("torn.marker")
    after_interrupt = not os.environ.get("INTERRUPT") or MARKER.exists()
    if os.environ.get("KILL_IN_SHARD_SAVE") and os.environ.get("RANK") == "0" and after_interrupt and not TORN.exists():
        finish, saves = FileSystemWriter.finish, []

        def killed_before_finishing(self, metadata, results):
            saves.append(1)
            if len(saves) == int(os.environ["KILL_IN_SHARD_SAVE"]):
                TORN.touch()
                os.kill(os.getpid(), signal.SIGKILL)
            return finish(self, metadata, results)

        FileSystemWriter.finish = killed_before_finishing

    def step(model, batch):
        interrupt_on_call()
        return gpt.step(model, batch)
""")


def assert_weights(one: dict, two: dict, equal: bool, rtol=1e-5, atol=1e-6) -> None:
    assert one.keys() == two.keys()
    close = all(torch.allclose(one[key].float(), two[key].float(), rtol=rtol, atol=atol) for key in one)
    assert close == equal



def build_trainer(*overrides: str, recipe: str = "interruptible.py"):
    """A Trainer in this process, as `python -m launcher recipe=... overrides` builds it (None: the run is complete)."""
    from launcher.cli.main import load_validated
    from launcher.distributed.env import DistEnv
    from launcher.distributed.stop import StopSignals
    from launcher.engine.trainer import Trainer

    one_process = DistEnv.from_environ({})
    _, loaded, cfg = load_validated([f"recipe={recipe}", "wandb.mode=disabled", "log.level=warning", *overrides],
                                    one_process)
    return Trainer.build(cfg, loaded, one_process, torch.device("cpu"), StopSignals(one_process))


_references: dict[tuple, dict] = {}


def reference_weights(workdir, nproc=2, extra=()):
    """The same run (RECIPE with ARGS), uninterrupted. Run once per test session for each (nproc, extra): it is
    deterministic, which is what every test comparing against it asserts bitwise, so a second run would only cost."""
    key = (nproc, tuple(extra))
    if key not in _references:
        check_ok(launch([*ARGS, "run.dir=reference", *extra], workdir, nproc=nproc))
        _references[key] = load_weights(workdir / "reference")
    return _references[key]


def assert_identical(weights, reference):
    assert weights.keys() == reference.keys()
    for key in reference:
        assert torch.equal(weights[key], reference[key]), f"{key} differs"


def assert_steps_increase(run_dir):
    steps = [record["step"] for record in read_metrics(run_dir)]
    assert steps == sorted(set(steps)), steps


TORCHRUN_BANNER = "OMP_NUM_THREADS"  # torchrun prints this when it starts workers


def error_lines(result) -> list[str]:
    """The launcher's error lines (not torchrun's report, which quotes the first one as its root cause)."""
    return [line for line in result.stderr.splitlines()
            if re.match(r"(\[rank \d+\] )?launcher: error:", line)]


def assert_user_error(result, message: str, torchrun: bool = False) -> None:
    """Exit code 2 (torchrun turns any worker failure into 1), the message once, no worker traceback."""
    assert result.returncode == (1 if torchrun else 2), result.stdout + result.stderr
    lines = error_lines(result)
    assert len(lines) == 1, f"expected the error once, got {lines}\n{result.stderr}"
    assert message in lines[0], lines[0]
    # torchrun reports a failed worker with a traceback of its own; the workers print none.
    assert "]: Traceback" not in result.stderr if torchrun else "Traceback" not in result.stderr


WANDB = str(Path(sys.executable).parent / "wandb")


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def wandb_records(offline_run: Path) -> list[dict]:
    """The run's transaction log, as wandb's own reader (`wandb leet inspect --json`) gives it."""
    (log_file,) = offline_run.glob("run-*.wandb")
    output = subprocess.run([WANDB, "leet", "inspect", "--json", str(log_file)], capture_output=True, text=True,
                            check=True).stdout
    return [json.loads(line) for line in output.splitlines()]


def history(records: list[dict]) -> list[dict]:
    return [record["history"]["item"] for record in records if record["type"] == "history"]


def run_id(records: list[dict]) -> str:
    return next(record["run"]["run_id"] for record in records if record["type"] == "run")


def without_credentials(tmp_path: Path) -> dict:
    """No W&B API key anywhere (a fresh home), so wandb.mode=auto means offline."""
    return {"HOME": str(tmp_path), "WANDB_API_KEY": None, **WANDB_ON}


def assert_no_run_left(workdir, result) -> None:
    """No run directory, and no wandb run though wandb.mode=auto would have logged offline."""
    assert not (workdir / "runs").exists()
    assert "wandb" not in result.stdout + result.stderr.replace("wandb.mode", "")
    assert not list(workdir.rglob("wandb"))


def launcher_lines(result) -> list[str]:
    """Every line the launcher printed in its own name (errors, stops, notes), on either stream; not the header."""
    return [line for line in (result.stdout + result.stderr).splitlines()
            if re.match(r"(\[rank \d+\] )?launcher: ", line) and not line.startswith("launcher: recipe ")]
