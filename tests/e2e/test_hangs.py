"""A rank stuck in its DataLoader worker, on 2 real processes: named with the recipe's line (by the timeout's diagnosis
and by `python -m launcher.stacks`), and its worker gone with the job however it ends; links planted in a live run's
stacks folder never followed."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import ARGS, RECIPE, launch, launcher_environ, start, wait_for

pytestmark = pytest.mark.e2e

# On rank 1 the DataLoader worker hangs in the first sample of step HANG_STEP's batch (32 samples a rank a step), and
# records its pid and start time first. Synthetic data: no scikit-learn to import, a quicker start.
HANGING = textwrap.dedent("""
    import os, time
    from pathlib import Path
    import torch
    from torch.utils.data import Dataset, TensorDataset, get_worker_info
    from launcher.recipes.digits import build_model, DEFAULTS

    class Hanging(Dataset):
        def __init__(self, data):
            self.data, self.read = data, 0

        def __len__(self):
            return len(self.data)

        def __getitem__(self, index):
            self.read += 1
            first_of_step = (int(os.environ["HANG_STEP"]) - 1) * 32 + 1
            if os.environ["RANK"] == "1" and get_worker_info() and self.read == first_of_step:
                stuck_reading()
            return self.data[index]

    def stuck_reading():
        Path(f"worker_{os.getpid()}").write_text(Path("/proc/self/stat").read_text().rpartition(")")[2].split()[19])
        time.sleep(600)  # a dead file system, a lock never released

    def build_datasets(cfg):
        generator = torch.Generator().manual_seed(0)
        images = torch.rand(640, 1, 8, 8, generator=generator)
        labels = torch.randint(0, 10, (640,), generator=generator)
        return Hanging(TensorDataset(images, labels)), TensorDataset(images[:64], labels[:64])
""")
STUCK_LINE = next(number for number, line in enumerate(HANGING.splitlines(), 1) if "time.sleep(600)" in line)
LOADER = ["recipe=hanging.py", "run.dir=x", "data.num_workers=1", "data.resident=never", "wandb.mode=disabled"]


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "hanging.py").write_text(HANGING)
    return tmp_path


def stuck_workers(workdir: Path) -> dict[int, str]:
    """pid -> start time of each worker that got stuck (recorded by the recipe)."""
    return {int(path.name.removeprefix("worker_")): path.read_text() for path in workdir.glob("worker_*")}


def running(pid: int, started: str) -> bool:
    """Whether the process ``pid`` started at ``started`` still runs (a zombie, ended but not yet reaped, does not)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return False
    return fields[19] == started and fields[0] != "Z"


def assert_none_left(workdir: Path) -> None:
    workers = stuck_workers(workdir)
    assert len(workers) == 1, workers
    wait_for(lambda: not any(running(pid, started) for pid, started in workers.items()), "the stuck worker to end", 30)


def stacks(workdir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher.stacks", "x"], cwd=workdir, env=launcher_environ(None),
                          capture_output=True, text=True, timeout=60)


def test_a_rank_stuck_in_its_loader_worker_is_named_with_the_recipes_line_and_the_worker_ends_with_the_job(workdir):
    result = launch([*LOADER, "dist.timeout_s=10"], workdir, nproc=2, env={"HANG_STEP": "5"}, timeout=200)
    assert result.returncode != 0
    said = next(text for text in result.stderr.splitlines() if text.startswith("[rank 0] launcher: error: "))
    assert said.startswith(
        "[rank 0] launcher: error: rank 1 did not reach the step-5 gradient all-reduce within dist.timeout_s=10 s; "
        f"it was in stuck_reading (hanging.py:{STUCK_LINE}) of its DataLoader worker 0, in the step-5 data loading "
        "(every rank's stacks: x/stacks/"), said
    answers = workdir / said.rpartition("(every rank's stacks: ")[2].rstrip(")")
    stuck = (answers / "rank_1.txt").read_text()
    assert "Thread MainThread of DataLoader worker 0 (pid " in stuck and "in stuck_reading" in stuck
    assert_none_left(workdir)  # its rank ended at once on torchrun's SIGTERM; the worker went with it


def test_a_live_runs_stacks_show_the_line_its_stuck_worker_is_in_and_a_killed_rank_leaves_no_worker(workdir):
    job = start([*LOADER, "dist.nproc_per_node=2", "dist.timeout_s=600"], workdir, env={"HANG_STEP": "3"})
    try:
        wait_for(lambda: stuck_workers(workdir), "rank 1's worker to get stuck")
        waiting = (f"step 3, data loading, in stuck_reading (hanging.py:{STUCK_LINE}) of its DataLoader worker 0\n")
        shown = []

        def shows_rank_1_waiting() -> bool:  # once it has trained on the batches read before the stuck one
            shown.append(stacks(workdir))
            return waiting in shown[-1].stdout

        wait_for(shows_rank_1_waiting, "rank 1 to wait for its worker", 120)
        assert shown[-1].returncode == 0 and shown[-1].stdout.rstrip().endswith("2 rank(s) answered")
        (worker,) = stuck_workers(workdir)
        assert f"Thread MainThread of DataLoader worker 0 (pid {worker}):" in shown[-1].stdout
        assert not list((workdir / "x" / "stacks").glob(".rank_1_worker_*"))  # the worker's answer, once read
        rank_1 = int(shown[-1].stdout.partition("== rank 1 (")[2].partition("pid ")[2].partition(")")[0])
        os.kill(rank_1, signal.SIGKILL)
        assert job.wait(timeout=120) != 0
    finally:
        if job.poll() is None:
            job.kill()
    assert_none_left(workdir)


def test_links_planted_in_a_live_runs_stacks_are_never_followed(tmp_path):
    (tmp_path / "interruptible.py").write_text(RECIPE)
    run, outside = tmp_path / "run", tmp_path / "outside"
    outside.mkdir()
    job = start([*ARGS, "run.dir=run", "wandb.mode=disabled", "dist.nproc_per_node=2", "train.epochs=50"], tmp_path,
                env={"STEP_SLEEP": "0.02"})
    try:
        wait_for(lambda: (run / "history.jsonl").exists(), "the run to start")
        (run / "stacks").mkdir(exist_ok=True)
        (run / "stacks" / "planted").symlink_to(outside)
        (run / "stacks" / "request_planted").write_text("planted")
        refused = "{} is a symbolic link, which stack requests never follow out of the run directory: remove it"
        request_refused = f"stack request planted not answered: {refused.format('run/stacks/planted')}"
        wait_for(lambda: request_refused in job.output.read_text(), "the request refused")
        shutil.move(run / "stacks", tmp_path / "moved")
        (run / "stacks").symlink_to(outside)
        (outside / "request_beyond").write_text("beyond")  # what a rank following the link would answer there
        shown = subprocess.run([sys.executable, "-m", "launcher.stacks", "run"], cwd=tmp_path,
                               env=launcher_environ(None), capture_output=True, text=True, timeout=60)
        assert shown.returncode == 1 and shown.stderr == f"launcher.stacks: error: {refused.format('run/stacks')}\n"
        folder_refused = f"stack requests not answered: {refused.format('run/stacks')}"
        wait_for(lambda: folder_refused in job.output.read_text(), "stacks/ refused")
        os.kill(job.pid, signal.SIGTERM)
        assert job.wait(timeout=120) == 75  # stopped as ever, with a checkpoint
    finally:
        if job.poll() is None:
            job.kill()
    output = job.output.read_text()
    assert output.count(request_refused) == 1 and output.count(folder_refused) == 1, output
    assert "Traceback" not in output, output
    assert [path.name for path in outside.iterdir()] == ["request_beyond"]
