"""Where users take runs: containers whose PID 1 is torchrun or the launcher, run directories on node-local disks,
file systems without hard links. Each on real processes, the cluster's accident simulated on this one machine."""

import os
import signal
import subprocess
from pathlib import Path

import pytest
from helpers import ARGS, RECIPE, TORCHRUN, check_ok, launch, launcher_environ, start, wait_for
from slurm_cluster import free_port

from launcher.checkpoint.formats import load_checkpoint

# A new PID namespace whose first process (PID 1) is the command, as in `docker run` without --init or a
# Kubernetes pod.
AS_PID_1 = ("unshare", "--pid", "--fork", "--mount-proc")
DIGITS = ["recipe=digits", "wandb.mode=disabled", "train.epochs=2"]


@pytest.fixture
def as_root():
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("the container tests need root on CI (a new PID namespace)")
        pytest.skip("not root: a new PID namespace needs root")


def test_a_run_whose_torchrun_is_pid_1_trains_to_the_end(tmp_path, as_root):
    """Past step 20, the first stop agreement: a worker whose parent is PID 1 once took that as its parent's death.
    (`python -m launcher` as PID 1: the next test's second run.)"""
    result = check_ok(launch([*DIGITS, "run.dir=x"], tmp_path, nproc=2, wrapper=AS_PID_1))
    assert "done: 44 steps" in result.stdout and "SIGHUP" not in result.stderr
    assert (tmp_path / "x" / "model.pt").is_file()


def test_a_stop_signal_to_pid_1_stops_with_a_checkpoint_and_the_same_command_continues(tmp_path, as_root):
    """`docker stop` sends SIGTERM to PID 1, here the launcher that started the workers."""
    (tmp_path / "interruptible.py").write_text(RECIPE)
    args = [*ARGS, "wandb.mode=disabled", "run.dir=x", "dist.nproc_per_node=2"]
    job = start(args, tmp_path, env={"STEP_SLEEP": "0.05"}, wrapper=AS_PID_1)
    wait_for(lambda: list((tmp_path / "x" / "checkpoints").glob("step_*.pt")), "a first checkpoint")
    (pid_1,) = map(int, Path(f"/proc/{job.pid}/task/{job.pid}/children").read_text().split())
    os.kill(pid_1, signal.SIGTERM)
    assert job.wait(timeout=60) == 75, job.output.read_text()
    assert "stopped after step" in job.output.read_text()
    resumed = check_ok(launch(args, tmp_path, wrapper=AS_PID_1))  # to the end, past every stop agreement
    assert "resumed from x/checkpoints/step_" in resumed.stdout and (tmp_path / "x" / "model.pt").is_file()
    assert "done: 66 steps" in resumed.stdout and "SIGHUP" not in resumed.stderr


def test_a_run_dir_on_node_local_disks_is_refused_in_one_line(tmp_path):
    """Two torchrun "nodes" of one process each, in folders of their own: the same relative run.dir names another
    directory on each, as one path does on nodes with local disks."""
    port, nodes = free_port(), []
    for rank in (0, 1):
        folder = tmp_path / f"node{rank}"
        folder.mkdir()
        command = [TORCHRUN, "--nnodes=2", f"--node-rank={rank}", "--nproc-per-node=1", "--rdzv-backend=c10d",
                   f"--rdzv-endpoint=localhost:{port}", "--rdzv-id=job", "-m", "launcher", *DIGITS,
                   "dist.strategy=fsdp", "run.dir=shared/run"]
        nodes.append(subprocess.Popen(command, cwd=folder, env=launcher_environ({}), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    results = [node.communicate(timeout=120) for node in nodes]
    assert all(node.returncode != 0 for node in nodes)
    stderr = "\n".join(err for _, err in results)
    lines = [line for line in stderr.splitlines() if "launcher: error:" in line and "traceback :" not in line]
    assert len(lines) == 1, stderr
    assert ("rank 1: run.dir=shared/run is not the directory rank 0 locked" in lines[0]
            and "must be on a file system every node shares, not on a node-local disk" in lines[0])
    assert not (tmp_path / "node0" / "shared").exists() and not (tmp_path / "node1" / "shared").exists()


# What some FUSE and object-store mounts answer to link(2).
NO_HARD_LINKS = """
import errno, os

def _link(*args, **kwargs):
    raise PermissionError(errno.EPERM, "Operation not permitted (no hard links here)")

os.link = _link
"""


def test_the_best_checkpoint_folder_is_copied_where_hard_links_fail(tmp_path):
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(NO_HARD_LINKS)  # every process of the job: no hard links
    python_path = os.pathsep.join(filter(None, [str(shim), os.environ.get("PYTHONPATH")]))
    check_ok(launch([*DIGITS, "run.dir=x", "dist.strategy=fsdp", "ckpt.best_metric=eval/accuracy"], tmp_path,
                    nproc=2, env={"PYTHONPATH": python_path}))
    best, last = tmp_path / "x" / "checkpoints" / "best", tmp_path / "x" / "checkpoints" / "step_000000044"
    assert load_checkpoint(best)["global_step"] in (22, 44)  # verified: every file's size and CRC-32
    assert all(path.stat().st_nlink == 1 for path in best.iterdir())  # copies, not links
    assert {path.name for path in best.iterdir()} == {path.name for path in last.iterdir()}
