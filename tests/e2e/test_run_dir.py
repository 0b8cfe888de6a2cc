"""Runs you can trust: the same command continues, one job per run directory, nothing overwritten or kept that
should not be, checkpoints verified, config changes on resume explicit, nonsense refused, no debris."""

import hashlib
import json
import os
import signal
import textwrap
import time
import zipfile

import pytest
import torch
from helpers import (
    ARGS,
    RECIPE,
    assert_identical,
    assert_no_run_left,
    assert_steps_increase,
    check_ok,
    descendants,
    epoch_records,
    error_lines,
    launch,
    load_weights,
    read_metrics,
    reference_weights,
    start,
    wait_for,
    without_credentials,
)

DIGITS = ["recipe=digits", "wandb.mode=disabled"]


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "interruptible.py").write_text(RECIPE)
    return tmp_path


def snapshot(folder) -> dict:
    """Every file under ``folder`` and a digest of its bytes."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def the_run_dir(workdir, recipe="interruptible"):
    (run_dir,) = (workdir / "runs" / recipe).iterdir()
    return run_dir


def command_for(how: str, extra=()) -> tuple[list[str], int | None]:
    """The same run as `python -m launcher ... dist.nproc_per_node=2` or `torchrun --standalone`, no run.dir."""
    args = [*ARGS, "wandb.mode=disabled", *extra]
    return (args + ["dist.nproc_per_node=2"], None) if how == "python" else (args, 2)


# 1. The same command continues, with no run.dir, after a graceful stop and after the whole job is killed.
@pytest.mark.parametrize("how", ["python", "torchrun"])
def test_the_same_command_continues_after_sigterm_without_run_dir(workdir, how):
    reference = reference_weights(workdir)
    args, nproc = command_for(how)
    stopped = launch(args, workdir, nproc=nproc, env={"INTERRUPT": "1:30:SIGTERM"})
    assert stopped.returncode == (75 if how == "python" else 1), stopped.stderr
    # Rank 1 got the signal during step 30; its flag went out with the agreement after step 30 (they come every
    # dist.stop_check_every=10 steps), all ranks read it after step 40 and wrote that step's checkpoint.
    assert "launcher: stopped after step 40 (a signal on another rank)" in stopped.stderr
    assert "run the same command to continue" in stopped.stderr
    run_dir = the_run_dir(workdir)
    resumed = check_ok(launch(args, workdir, nproc=nproc, env={"INTERRUPT": "1:30:SIGTERM"}))
    assert (f"resumed from {run_dir.relative_to(workdir)}/checkpoints/step_000000040.pt: epoch 2, step 18 of it"
            in resumed.stdout)
    assert_identical(load_weights(run_dir), reference)
    assert_steps_increase(run_dir)


@pytest.mark.parametrize("how", ["python", "torchrun"])
def test_the_same_command_continues_after_sigkill_of_the_whole_job(workdir, how):
    """The second start is the same Slurm job requeued (its job id, one restart more): it takes over at once."""
    reference = reference_weights(workdir)
    args, nproc = command_for(how)
    job = start(args, workdir, nproc=nproc, env={"STEP_SLEEP": "0.05", "SLURM_JOB_ID": "4343"})
    wait_for(lambda: list((workdir / "runs").glob("*/*/checkpoints/step_*.pt")), "a first checkpoint")
    for pid in [job.pid, *descendants(job.pid)]:
        os.kill(pid, signal.SIGKILL)
    job.wait()
    run_dir = the_run_dir(workdir)
    assert (run_dir / ".lock").exists()  # the killed job's, left behind
    resumed = check_ok(launch(args, workdir, nproc=nproc, env={"SLURM_JOB_ID": "4343", "SLURM_RESTART_COUNT": "1"}))
    assert ": took over from job " in resumed.stdout and "its process is gone" in resumed.stdout
    assert "resumed from" in resumed.stdout
    assert_identical(load_weights(run_dir), reference)
    assert not (run_dir / ".lock").exists()


# 2. A fresh start never takes over a directory that holds a run; a new run is one switch away.
def test_a_fresh_start_in_a_used_run_dir_is_refused_and_changes_nothing(tmp_path):
    check_ok(launch([*DIGITS, "run.dir=x", "train.epochs=3", "ckpt.every_steps=10"], tmp_path))
    before = snapshot(tmp_path / "x")
    fresh = launch([*DIGITS, "run.dir=x", "train.epochs=2", "optim.lr=0.01", "ckpt.resume=never",
                    "ckpt.every_steps=10"], tmp_path, nproc=2)
    assert fresh.returncode != 0
    assert "ckpt.resume=never starts a run at step 0, but run.dir=x already holds run" in fresh.stderr
    assert snapshot(tmp_path / "x") == before  # and the same command again: test_rerunning_a_finished_run_...
    # A new run, deliberately: a name of its own.
    check_ok(launch([*DIGITS, "run.name=second", "train.epochs=2", "optim.lr=0.01", "train.log_every=10"], tmp_path))
    second = tmp_path / "runs" / "digits" / "second"
    assert [record["epoch"] for record in epoch_records(second)] == [1, 2]
    assert {record["lr/group0"] for record in read_metrics(second) if "lr/group0" in record} == {0.01}


# 3. Checkpoints nobody can read are never counted as the run's, nor deleted, nor allowed to push out new ones.
def test_when_every_checkpoint_is_unreadable_the_new_ones_are_kept(tmp_path):
    check_ok(launch([*DIGITS, "run.dir=x", "train.epochs=3", "ckpt.every_steps=10"], tmp_path))
    folder = tmp_path / "x" / "checkpoints"
    broken = sorted(p.name for p in folder.glob("step_*.pt"))
    assert broken == ["step_000000050.pt", "step_000000060.pt", "step_000000066.pt"]
    for name in broken:
        path = folder / name
        path.write_bytes(path.read_bytes()[:100])
    result = check_ok(launch([*DIGITS, "run.dir=x", "train.epochs=2", "ckpt.every_steps=10"], tmp_path, nproc=2))
    assert result.stdout.count("is unreadable") == 3 and "starts again at step 0" in result.stdout
    assert sorted(p.name for p in folder.glob("step_*.pt")) == [
        "step_000000030.pt", "step_000000040.pt", "step_000000044.pt", *broken]
    assert all((folder / name).stat().st_size == 100 for name in broken)  # left as they were
    assert torch.load(folder / "step_000000044.pt", weights_only=True)["global_step"] == 44


# 4. A checkpoint whose bytes changed is detected and skipped.
def test_a_bit_flipped_checkpoint_is_detected_and_the_one_before_is_used(workdir):
    reference = reference_weights(workdir, nproc=None)
    check_ok(launch([*ARGS, "run.dir=run", "train.epochs=2"], workdir))
    newest = workdir / "run" / "checkpoints" / "step_000000044.pt"
    with zipfile.ZipFile(newest) as archive:  # the largest tensor record: the zip structure stays intact
        record = max((info for info in archive.infolist() if "/data/" in info.filename), key=lambda i: i.file_size)
    raw = bytearray(newest.read_bytes())
    name_and_extra = int.from_bytes(raw[record.header_offset + 26:record.header_offset + 28], "little") + \
        int.from_bytes(raw[record.header_offset + 28:record.header_offset + 30], "little")
    middle = record.header_offset + 30 + name_and_extra + record.file_size // 2
    for i in range(middle, middle + 64):
        raw[i] ^= 0x5A
    newest.write_bytes(bytes(raw))
    assert torch.load(newest, weights_only=True)["global_step"] == 44  # torch's own reader does not notice
    result = check_ok(launch([*ARGS, "run.dir=run", "train.epochs=3"], workdir))
    warnings = [line for line in result.stdout.splitlines() if "is unreadable" in line]
    assert len(warnings) == 1 and "step_000000044.pt" in warnings[0] and "does not match its checksum" in warnings[0]
    assert "resumed from run/checkpoints/step_000000040.pt" in result.stdout
    assert_identical(load_weights(workdir / "run"), reference)


# 5. Optimizer and schedule keys changed on resume take effect, said in one line each and recorded.
def test_a_changed_learning_rate_on_resume_is_applied_said_and_recorded(tmp_path):
    check_ok(launch([*DIGITS, "run.dir=x", "train.epochs=2", "train.log_every=5"], tmp_path))
    result = check_ok(launch([*DIGITS, "run.dir=x", "train.epochs=3", "train.log_every=5", "optim.lr=0.001"],
                             tmp_path))
    assert "changed since the checkpoint: optim.lr 0.05 -> 0.001, applied to the restored optimizer" in result.stdout
    assert "changed since the checkpoint: train.epochs 2 -> 3" in result.stdout
    lrs = {record["step"]: record["lr/group0"] for record in read_metrics(tmp_path / "x") if "lr/group0" in record}
    assert {lr for step, lr in lrs.items() if step <= 44} == {0.05}
    assert {lr for step, lr in lrs.items() if step > 44} == {0.001}
    history = [json.loads(line) for line in (tmp_path / "x" / "history.jsonl").read_text().splitlines()]
    starts = [event for event in history if event["event"] == "start"]
    assert starts[1]["changes"] == {"optim.lr": [0.05, 0.001], "train.epochs": [2, 3]}
    assert starts[1]["resumed_from"] == {"checkpoint": "x/checkpoints/step_000000044.pt", "step": 44}
    assert [event["outcome"] for event in history if event["event"] == "end"] == ["finished", "finished"]
    assert "lr: 0.001" in (tmp_path / "x" / "config.yaml").read_text()


# 6. A start refused on resume writes nothing.
def test_a_resume_that_fails_its_checks_writes_nothing(tmp_path):
    check_ok(launch([*DIGITS, "run.dir=x", "train.epochs=1"], tmp_path))
    before = snapshot(tmp_path / "x")
    result = launch([*DIGITS, "run.dir=x", "train.epochs=2", "model.channels=16", "train.seed=3"], tmp_path, nproc=2)
    assert result.returncode != 0
    assert ("run.dir=x cannot continue with these keys changed since its checkpoint: model.channels 32 -> 16, "
            "train.seed 0 -> 3") in result.stderr
    assert snapshot(tmp_path / "x") == before


# 7. One job per run directory: a second is refused at once, the first goes on undisturbed; so is a second start in
# the same Slurm allocation (the same job id: two srun steps, or two commands in one salloc).
def test_a_second_job_on_a_run_dir_in_use_is_refused_and_the_first_is_undisturbed(workdir):
    reference = reference_weights(workdir)
    allocation = {"SLURM_JOB_ID": "4242"}
    first = start([*ARGS, "run.dir=run"], workdir, nproc=2, env={"STEP_SLEEP": "0.3", **allocation})
    wait_for(lambda: (workdir / "run" / ".lock").exists(), "the first job's lock")
    second = launch([*ARGS, "run.dir=run"], workdir, nproc=2)
    same_allocation = launch([*ARGS, "run.dir=run"], workdir, nproc=2, env=allocation)
    parent = launch([*ARGS, "run.dir=run", "dist.nproc_per_node=2"], workdir, env=allocation)
    assert first.poll() is None  # all were refused while the first was still training
    for refused in (second, same_allocation):
        assert refused.returncode != 0 and "launcher: error: run.dir=run is in use by another job (" in refused.stderr
    assert "(job 4242, pid" in same_allocation.stderr
    assert parent.returncode == 2 and "is in use by another job" in parent.stderr
    assert "OMP_NUM_THREADS" not in parent.stderr  # refused before any worker started
    assert first.wait(timeout=300) == 0
    assert_identical(load_weights(workdir / "run"), reference)
    assert_steps_increase(workdir / "run")
    assert len([line for line in (workdir / "run" / "history.jsonl").read_text().splitlines()]) == 2


def test_a_lock_file_naming_no_holder_is_one_line_within_seconds_and_taken_over_once_stale(tmp_path):
    """One that names a pid no process has (1e999 overflows the pid's int); an empty, truncated or another program's
    file takes the same path (tests/unit/test_run_lock.py has each)."""
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / ".lock").write_bytes(
        b'{"host": "n1", "pid": 1e999, "started": "1", "job": null, "token": "t", "since": "then"}')
    began = time.monotonic()
    refused = launch([*DIGITS, "run.dir=x", "train.epochs=1"], tmp_path, timeout=60)
    assert time.monotonic() - began < 30  # the start itself (imports) and the lock's 2 s of grace
    (line,) = error_lines(refused)
    assert refused.returncode == 2 and "run.dir=x: x/.lock " in line
    assert "If no job uses it, delete it; otherwise it is taken over once nothing has touched" in line
    stale = time.time() - 120
    os.utime(tmp_path / "x" / ".lock", (stale, stale))
    taken = check_ok(launch([*DIGITS, "run.dir=x", "train.epochs=1"], tmp_path))
    assert "run.dir=x: took over from no one (its file names no holder and nothing touched it for 12" in taken.stdout


LOCK_OF_ANOTHER_HOST = {"host": "elsewhere", "pid": 4, "started": "", "job": "9", "attempt": [0, 0],
                        "token": "theirs", "since": "2026-12-01 10:00:00"}


@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_during_a_wait_for_the_lock_ends_the_start_at_once(tmp_path, processes):
    """A holder on another host is watched for a minute; Ctrl-C or a preemption then ends the wait at once."""
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / ".lock").write_text(json.dumps(LOCK_OF_ANOTHER_HOST))
    job = start([*DIGITS, "run.dir=x", f"dist.nproc_per_node={processes}"], tmp_path)
    wait_for(lambda: "watching its heartbeat" in job.output.read_text(), "the wait for the lock", 60)
    job.send_signal(signal.SIGTERM)
    began = time.monotonic()
    assert job.wait(timeout=30) == 75, job.output.read_text()
    assert time.monotonic() - began < 5
    output = job.output.read_text()
    assert "stopped by SIGTERM while watching the heartbeat of job 9, pid 4 on elsewhere" in output
    assert json.loads((tmp_path / "x" / ".lock").read_text())["token"] == "theirs"  # theirs, untouched
    assert not descendants(job.pid)


# 8. Nonsense fails loudly.
NAN_DATA = textwrap.dedent("""
    import torch
    from launcher.recipes.digits import DEFAULTS, build_model, build_datasets as digits_datasets

    def build_datasets(cfg):
        train, evaluation = digits_datasets(cfg)
        images, labels = train.tensors
        images[::7] = float("nan")
        return torch.utils.data.TensorDataset(images, labels), evaluation
""")


@pytest.mark.parametrize("cause, args, message, ended_at", [
    # The LR jumps 1e12-fold at step 30 (after the checkpoint of step 30): the weights blow up, the loss read at
    # step 35 is not finite, and the checkpoint due at step 40 refuses to be written.
    ("huge learning rate",
     ["recipe=digits", "sched.name=step", "sched.step_size=30", "sched.gamma=1e12", "ckpt.every_steps=10"],
     "at step 40; the last good checkpoint is x/checkpoints/step_000000030.pt", 40),
    # NaN from the first step: the loss logged at step 5 is NaN; the ranks agree on it at step 20.
    ("NaN inputs", ["recipe=nan_data.py"], "at step 5; no checkpoint was written", 20),
])
def test_a_non_finite_loss_stops_the_run_naming_the_step_and_the_last_good_checkpoint(tmp_path, cause, args, message,
                                                                                    ended_at):
    (tmp_path / "nan_data.py").write_text(NAN_DATA)
    result = launch([*args, "wandb.mode=disabled", "run.dir=x", "train.log_every=5"], tmp_path, nproc=2)
    assert result.returncode != 0
    (line,) = error_lines(result)
    assert f"training diverged: the loss is not a finite number {message}" in line
    if "no checkpoint was written" in message:  # a new run with nothing to continue from leaves nothing
        assert not (tmp_path / "x").exists()
        return
    assert not (tmp_path / "x" / "model.pt").exists()
    for path in (tmp_path / "x" / "checkpoints").glob("step_*.pt"):
        weights = torch.load(path, weights_only=True)["model"]
        assert all(torch.isfinite(tensor).all() for tensor in weights.values()), path
    ended = json.loads((tmp_path / "x" / "history.jsonl").read_text().splitlines()[-1])
    assert ended["outcome"] == "failed" and "training diverged" in ended["detail"] and ended["step"] == ended_at


def test_a_best_metric_evaluation_never_produces_fails_at_the_first_evaluation(tmp_path):
    result = launch([*DIGITS, "run.dir=x", "ckpt.best_metric=eval/f1"], tmp_path, nproc=2)
    assert result.returncode != 0
    assert ("ckpt.best_metric=eval/f1 is not a metric this run's evaluation produces (eval/accuracy, eval/loss)"
            in result.stderr)
    assert not (tmp_path / "x").exists()  # nothing was checkpointed: nothing to continue from, nothing left


def test_an_empty_eval_set_fails_at_setup_and_leaves_nothing(tmp_path):
    (tmp_path / "empty_eval.py").write_text(textwrap.dedent("""
        import torch
        from launcher.recipes.digits import DEFAULTS, build_model, build_datasets as digits_datasets

        def build_datasets(cfg):
            train, evaluation = digits_datasets(cfg)
            return train, torch.utils.data.Subset(evaluation, [])
    """))
    result = launch(["recipe=empty_eval.py"], tmp_path, nproc=2)
    assert result.returncode != 0 and "the recipe's eval set is empty" in result.stderr
    assert not (tmp_path / "runs").exists()


# 9. No debris from failed starts; a finished run says it is finished.
def test_a_start_that_fails_leaves_no_run_directory_and_no_wandb_run(tmp_path):
    """In building the model (missing data: test_cli.py's
    test_missing_data_is_reported_once_before_training_and_leaves_no_run)."""
    (tmp_path / "bad_model.py").write_text(
        "from launcher.recipes.digits import build_datasets\ndef build_model(cfg):\n    return 'not a model'\n")
    result = launch(["recipe=bad_model.py"], tmp_path, nproc=2, env=without_credentials(tmp_path))
    assert result.returncode != 0 and "launcher: error:" in result.stderr
    assert_no_run_left(tmp_path, result)


def test_rerunning_a_finished_run_says_it_is_complete_and_where_its_model_is(tmp_path):
    check_ok(launch([*DIGITS, "train.epochs=2"], tmp_path))
    run_dir = the_run_dir(tmp_path, "digits")
    before = snapshot(run_dir)
    again = check_ok(launch([*DIGITS, "train.epochs=2"], tmp_path, nproc=2))
    assert f"run.dir {run_dir.relative_to(tmp_path)} is complete: 44 steps, 2 epochs" in again.stdout
    assert f"model: {run_dir.relative_to(tmp_path)}/model.pt" in again.stdout
    assert "resumed from" not in again.stdout and "epoch 1/2" not in again.stdout
    assert snapshot(run_dir) == before
    longer = check_ok(launch([*DIGITS, "train.epochs=3"], tmp_path))  # the same run, trained on
    assert f"resumed from {run_dir.relative_to(tmp_path)}/checkpoints/step_000000044.pt" in longer.stdout
    assert [record["epoch"] for record in epoch_records(run_dir)] == [1, 2, 3]
