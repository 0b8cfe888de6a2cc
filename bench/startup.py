"""Startup: seconds from the command to the first optimizer step, and to a clean exit of a 1-step run.

    python bench/startup.py [--reps 3] [--arch lenet]

Compares ``python -m launcher`` and ``torchrun -m launcher`` (bench/workload.py, 60,000 in-memory images) with
the plain loop script under ``python`` and ``torchrun``, alternating the commands each repetition. The first
step's time comes from bench/workload.py's FirstStepClock (rank 0). Prints one JSON object per command (medians).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from overhead import TORCHRUN, bench_env  # noqa: E402  (the same environment for every benchmark)

PYTHON = sys.executable


def commands(arch: str) -> dict[str, list[str]]:
    launcher = ["-m", "launcher", f"recipe={BENCH / 'workload.py'}", f"model.arch={arch}", "train.max_steps=1",
                "--quiet"]
    plain = [str(BENCH / "plain_ddp.py"), f"--arch={arch}", "--max-steps=1"]
    torchrun = [TORCHRUN, "--standalone", "--nproc_per_node=2"]
    return {
        "python -m launcher": [PYTHON, *launcher],
        "python -m launcher wandb.mode=disabled": [PYTHON, *launcher, "wandb.mode=disabled"],
        "python plain_ddp.py": [PYTHON, *plain],
        "torchrun x2 -m launcher": [*torchrun, *launcher],
        "torchrun x2 -m launcher wandb.mode=disabled": [*torchrun, *launcher, "wandb.mode=disabled"],
        "torchrun x2 plain_ddp.py": [*torchrun, *plain],
    }


def time_command(command: list[str], workdir: Path) -> dict:
    """One timed run, in a directory of its own: the launcher's runs/ there is new, so it trains (the same command
    in the same directory would find its run complete)."""
    workdir = Path(tempfile.mkdtemp(dir=workdir))
    out = workdir / "first_step.json"
    env = {**bench_env(), "BENCH_OUT": str(out), "BENCH_TRAIN_SAMPLES": "60000"}
    start = time.time()
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    end = time.time()
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return {"first_step_s": json.loads(out.read_text())["first_step_at"] - start, "exit_s": end - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--arch", default="lenet")
    parser.add_argument("--commands", nargs="+", metavar="NAME", help="only these of the commands (default: all)")
    args = parser.parse_args()
    cases = {name: command for name, command in commands(args.arch).items()
             if not args.commands or name in args.commands}
    timings: dict[str, list[dict]] = {name: [] for name in cases}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            for name in (list(cases) if rep % 2 == 0 else list(reversed(cases))):
                timings[name].append(time_command(cases[name], Path(tmp)))
    keys = ("first_step_s", "exit_s")
    for name, runs in timings.items():
        print(json.dumps({"command": name, "reps": len(runs),
                          **{key: statistics.median(run[key] for run in runs) for key in keys},
                          **{f"{key}_all": [round(run[key], 2) for run in runs] for key in keys}}))


if __name__ == "__main__":
    main()
