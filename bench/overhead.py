"""Training-loop overhead: the launcher's loop against a hand-written DDP loop, side by side in the same processes.

    python bench/overhead.py [--archs lenet mlp] [--procs 1 2] [--reps 3] [--chunks 54] [--chunk-steps 15]

For each model and process count, runs ``torchrun bench/interleave.py`` ``--reps`` times; each run alternates
chunks of launcher steps and plain steps (see interleave.py). Prints one JSON object per run, then one summary
per case: the ratio is launcher steps/s over plain steps/s (1.0: no overhead; the goal is >= 0.98).

On a GPU machine (one process per GPU; ResNet-18 on 32x32 images, bf16, channels_last, then compiled as well):

    python bench/overhead.py --archs resnet18 --procs 1 --data-wait \
        --launcher-args train.amp=bf16 train.channels_last=true [train.compile=true]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def bench_env() -> dict:
    """One thread per process (two processes share this machine's two cores); no W&B credentials: offline."""
    environ = {**os.environ, "OMP_NUM_THREADS": "1"}
    environ.pop("WANDB_API_KEY", None)
    return environ


def run_json(command: list[str], workdir: Path) -> dict:
    """Run ``command``; its last line of output, as JSON."""
    result = subprocess.run(command, cwd=workdir, env=bench_env(), capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_interleaved(arch: str, procs: int, args, workdir: Path) -> dict:
    torchrun = [TORCHRUN, "--standalone", f"--nproc_per_node={procs}"]
    run = run_json([*torchrun, str(BENCH / "interleave.py"), f"--arch={arch}", f"--chunks={args.chunks}",
                    f"--chunk-steps={args.chunk_steps}", f"--warmup={args.warmup}",
                    *(["--data-wait"] if args.data_wait else []), *(["--limit"] if args.limit else []),
                    *(["--unobserved"] if args.unobserved else []),
                    *args.launcher_args], workdir)
    if args.lightning:  # in processes of its own, right after: read against this run's plain loop
        settings = [arg for arg in args.launcher_args
                    if arg.startswith(("train.amp=", "train.channels_last=", "train.compile=", "train.compile_mode="))]
        peer = run_json([*torchrun, str(BENCH / "lightning_side.py"), f"--arch={arch}",
                         f"--steps={args.chunks * args.chunk_steps}", f"--warmup={args.warmup}", *settings], workdir)
        run.update(lightning_steps_per_s=peer["lightning_steps_per_s"],
                   lightning_samples_per_s=peer["lightning_steps_per_s"] * run["global_batch"],
                   ratio_to_lightning=run["launcher_steps_per_s"] / peer["lightning_steps_per_s"],
                   lightning_to_plain=peer["lightning_steps_per_s"] / run["plain_steps_per_s"])
    return run


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def pooled(runs: list[dict], reference: str, side: str) -> float:
    """``side``'s steps/s over ``reference``'s, over the time both took in all runs together."""
    seconds = {name: sum(1 / run[f"{name}_steps_per_s"] for run in runs) for name in (reference, side)}
    return seconds[reference] / seconds[side]


def summarize(runs: list[dict]) -> dict:
    keys = ("launcher_steps_per_s", "plain_steps_per_s", "launcher_samples_per_s", "plain_samples_per_s",
            "launcher_cpu_ms_per_step", "plain_cpu_ms_per_step")
    first = runs[0]
    return {
        "summary": True, "arch": first["arch"], "procs": first["procs"], "runs": len(runs),
        "ratio": spread([run["ratio"] for run in runs]),
        "control_ratio": spread([run["control_ratio"] for run in runs]),
        # All runs' timed steps as one measurement (every run times the same number of steps per side).
        "pooled_ratio": pooled(runs, "plain", "launcher"),
        "pooled_control_ratio": pooled(runs, "plain", "plain_again"),
        **{key: statistics.median(run[key] for run in runs) for key in keys},
        **{key: first[key] for key in first if key.endswith(("host_reads_per_step", "collectives_per_step"))},
        "device": first["device"], "launcher_args": first["launcher_args"],
        **{key: statistics.median(run[key] for run in runs) for key in (
            "data_wait_fraction", "observability_cost", "ratio_to_limit", "limit_samples_per_s", "ratio_to_lightning",
            "lightning_to_plain", "lightning_samples_per_s") if key in first},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["lenet", "mlp"])
    parser.add_argument("--procs", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--reps", type=int, default=3, help="separate runs per case")
    parser.add_argument("--chunks", type=int, default=54)
    parser.add_argument("--chunk-steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--launcher-args", nargs="*", default=[],
                        help="key=value overrides for the launcher's run (the plain loop and Lightning follow "
                             "train.amp, train.channels_last, train.compile and its mode), e.g. wandb.mode=disabled")
    parser.add_argument("--data-wait", action="store_true", help="also measure the data wait fraction (GPU)")
    parser.add_argument("--unobserved", action="store_true",
                        help="also time the launcher's loop with its observability stubbed out: what it costs")
    parser.add_argument("--limit", action="store_true",
                        help="also time a plain loop on data resident on the device (compiled on a GPU)")
    parser.add_argument("--lightning", action="store_true",
                        help="also time Lightning's Trainer on the workload (needs the bench extra)")
    parser.add_argument("--workdir", type=Path, default=Path.cwd())
    args = parser.parse_args()
    for arch in args.archs:
        for procs in args.procs:
            runs = []
            for _ in range(args.reps):
                runs.append(run_interleaved(arch, procs, args, args.workdir))
                print(json.dumps(runs[-1]), flush=True)
            print(json.dumps(summarize(runs)), flush=True)


if __name__ == "__main__":
    main()
