"""The Slurm templates on a real Slurm cluster (started by the `slurm` fixture), and the submit command."""

import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, check_ok, launch, load_weights, offline_runs, wandb_records

pytestmark = pytest.mark.slurm


def submit(cwd: Path, *args: str, env: dict | None = None) -> int:
    """`python -m launcher.slurm ARGS` (validates, renders, submits); returns the job id. The test cluster's nodes
    have 2 CPUs: the jobs ask for those."""
    result = subprocess.run([sys.executable, "-m", "launcher.slurm", "--cpus-per-task", "2", *args], cwd=cwd, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return int(re.search(r"Submitted batch job (\d+)", result.stdout).group(1))


def log_of(cwd: Path, name: str) -> str:
    return (cwd / "logs" / name).read_text()


def test_submit_validates_before_it_submits_and_dry_run_writes_and_prints_the_script(tmp_path):
    command = [sys.executable, "-m", "launcher.slurm"]
    typo = subprocess.run([*command, "multi", "--nodes", "2", "recipe=digits", "train.epoch=3"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert typo.returncode == 2 and "unknown key 'train.epoch': did you mean train.epochs" in typo.stderr
    uneven = subprocess.run([*command, "multi", "--nodes", "2", "--gpus-per-node", "8", "recipe=digits",
                             "train.batch_size=100"], cwd=tmp_path, capture_output=True, text=True)
    assert uneven.returncode == 2 and "must split evenly over 16 processes" in uneven.stderr
    no_sweep = subprocess.run([*command, "array", "recipe=digits"], cwd=tmp_path, capture_output=True, text=True)
    assert no_sweep.returncode == 2 and "the array template needs --sweep FILE" in no_sweep.stderr
    dry = subprocess.run([*command, "multi", "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu",
                          "--time", "04:00:00", "--account", "lab", "--dry-run", "recipe=digits",
                          "dist.strategy=fsdp"],
                         cwd=tmp_path, capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    for line in ["#SBATCH --nodes=4", "#SBATCH --partition=gpu", "#SBATCH --time=04:00:00", "#SBATCH --account=lab",
                 "#SBATCH --gpus-per-node=8", "export LAUNCHER_NPROC=8", "--rdzv_id=\"$SLURM_JOB_ID\""]:
        assert line in dry.stdout, line
    assert dry.stdout.startswith("# sbatch logs/launcher-")
    assert dry.stdout.splitlines()[0].endswith(" recipe=digits dist.strategy=fsdp")  # passed through unchanged
    (script,) = (tmp_path / "logs").glob("*.sbatch")  # a dry run writes the script it prints the command for
    assert dry.stdout.splitlines()[0].split()[2] == f"logs/{script.name}"
    assert dry.stdout.split("\n", 1)[1] == script.read_text()


def test_sbatch_single_node_template_trains_to_completion_with_its_output_elsewhere(slurm, tmp_path):
    """Raw sbatch, its output sent elsewhere (-o) from a folder without logs/: the status file's folder is made."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    job = slurm.sbatch(
        f"--export=ALL,LAUNCHER_TEMPLATES={REPO / 'slurm'},LAUNCHER_NPROC=2", "--cpus-per-task=2",
        "-o", str(scratch / "job.out"), str(REPO / "slurm" / "single_node.sbatch"),
        "recipe=digits", "train.epochs=3", "ckpt.every_steps=10", cwd=tmp_path,
    )
    log = lambda: (scratch / "job.out").read_text()  # noqa: E731
    assert slurm.wait_until_done(job)["JobState"] == "COMPLETED", log()
    (run_dir,) = (tmp_path / "runs" / "digits").iterdir()
    assert {"metrics.jsonl", "model.pt", "config.yaml", "checkpoints"} <= {p.name for p in run_dir.iterdir()}
    assert list((run_dir / "checkpoints").glob("step_*.pt"))
    assert "launcher: the run finished (exit 0)" in log() and "cannot write" not in log()
    assert "2 process(es), backend gloo" in log()
    assert (tmp_path / "logs" / f"launcher-{job}.status").read_text() == "finished\n"


FAKE_HOSTNAME = """#!/bin/sh
# Like Debian's hostname on a host whose name maps to 127.0.1.1: --ip-address gives a loopback address.
case "$1" in
    --ip-address|-i) echo 127.0.1.1 ;;
    --all-ip-addresses|-I) echo "127.0.0.2 " ;;
    *) exec /bin/hostname "$@" ;;
esac
"""


def test_multi_node_template_runs_on_two_nodes(slurm, tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "hostname").write_text(FAKE_HOSTNAME)
    (fake_bin / "hostname").chmod(0o755)
    env = {**slurm.env, "PATH": f"{fake_bin}:{slurm.env['PATH']}"}
    job = submit(tmp_path, "multi", "--nodes", "2", "recipe=digits", "train.epochs=2", "dist.strategy=fsdp", env=env)
    state = slurm.wait_until_done(job)
    log = log_of(tmp_path, f"launcher-{job}.out")
    assert state["JobState"] == "COMPLETED", log
    assert state["NodeList"] == "n[1-2]"
    assert "2 nodes, rendezvous at 127.0.0.2:" in log  # not the loopback 127.0.1.1 `hostname -i` gives
    assert "2 process(es), backend gloo" in log
    assert "fsdp: 0 blocks sharded one by one" in log  # the model sharded over the two nodes' processes
    (run_dir,) = (tmp_path / "runs" / "digits").iterdir()
    assert (run_dir / "model.pt").is_file() and (run_dir / "checkpoints" / "step_000000044" / "launcher.pt").is_file()


SLOW_RECIPE = textwrap.dedent("""
    import time
    import torch.nn.functional as F
    from launcher.recipes.digits import DEFAULTS, build_datasets, build_model

    def loss(outputs, targets):  # slow steps, so the job is still running when the signal comes
        time.sleep(0.05)
        return F.cross_entropy(outputs, targets)
""")


def test_time_limit_signal_checkpoints_requeues_and_resumes_to_the_same_weights(slurm, tmp_path):
    (tmp_path / "slow.py").write_text(SLOW_RECIPE)
    overrides = ["recipe=slow.py", "train.epochs=3", "ckpt.every_steps=5"]
    check_ok(launch([*overrides, "run.dir=reference"], tmp_path, nproc=2))
    job = submit(tmp_path, "single", "--nproc-per-node", "2", *overrides, env=slurm.env)
    slurm.wait_for(lambda: list((tmp_path / "runs" / "slow").glob("*/checkpoints/step_*.pt")), "a first checkpoint",
                   120)
    (checkpoints,) = (tmp_path / "runs" / "slow").glob("*/checkpoints")
    # What Slurm's --signal=B:USR1@SECONDS does before the time limit.
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job)], check=True, env=slurm.env)
    slurm.wait_for(lambda: slurm.job(job).get("Restarts") == "1", "requeue", 120)
    # Slurm holds a requeued job back (about 120 s) partly so that the old run is gone before the new one starts:
    # slurmd refuses a launch whose credential dates from the second its old one was revoked.
    slurm.wait_for(lambda: slurm.run("sinfo", "-h", "-o", "%T").split() == ["idle"], "the old run gone", 60)
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], check=True, env=slurm.env)
    state = slurm.wait_until_done(job)
    log = log_of(tmp_path, f"launcher-{job}.out")
    assert state["JobState"] == "COMPLETED", log
    assert f"SIGUSR1: stopping to requeue job {job}" in log and "launcher: stopped after step" in log
    assert "launcher: the run stopped (exit" in log and "launcher: the run finished (exit 0)" in log
    assert "resumed from" in log
    reference, resumed = load_weights(tmp_path / "reference"), load_weights(checkpoints.parent)
    assert all(torch.equal(reference[key], resumed[key]) for key in reference)


def test_array_template_runs_one_task_per_sweep_line(slurm, tmp_path):
    (tmp_path / "sweep.txt").write_text('# seeds\ntrain.seed=1\n\ntrain.seed=2 optim.lr=0.1 wandb.name="seed two"\n')
    job = submit(tmp_path, "array", "--sweep", "sweep.txt", "recipe=digits", "train.epochs=1", env=slurm.env)
    slurm.wait_for(lambda: not slurm.run("squeue", "-h", "-j", str(job)).strip(), "both array tasks done", 300)
    # One run directory per sweep line (the lines define different runs), told apart by their config.
    runs = sorted((tmp_path / "runs" / "digits").iterdir(),
                  key=lambda run: "seed: 2" in (run / "config.yaml").read_text())
    assert all((run / "model.pt").exists() for run in runs)
    first, second = ((run / "config.yaml").read_text() for run in runs)
    assert "seed: 1" in first and "lr: 0.05" in first
    assert "seed: 2" in second and "lr: 0.1" in second and "name: seed two" in second  # quotes kept it one value
    log = log_of(tmp_path, f"launcher-sweep-{job}_2.out")
    assert "sweep.txt line 4): train.seed=2 optim.lr=0.1 wandb.name=seed two" in log
    # Each task is its own wandb run, in one group: the sweep.
    groups = {record["run"]["run_group"] for run in runs for record in wandb_records(*offline_runs(run))
              if record["type"] == "run"}
    assert groups == {str(job)}
