"""Checkpoints that survive anything: kills, signals, torn writes, truncated files; exact resume; retention."""

import textwrap

import pytest
import torch
from helpers import (
    ARGS,
    RECIPE,
    assert_identical,
    check_ok,
    epoch_records,
    history,
    launch,
    load_weights,
    offline_runs,
    read_metrics,
    reference_weights,
    run_id,
    wandb_records,
    without_credentials,
)


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "interruptible.py").write_text(RECIPE)
    return tmp_path


def test_sigkill_mid_epoch_then_torchrun_restart_ends_bitwise_identical_with_its_schedule_and_wandb_run(workdir):
    """The second attempt resumes from the newest checkpoint; its weights, learning rates (a cosine schedule with
    warmup) and wandb run (one run id, logged steps never going back) are those of an uninterrupted run."""
    args = [*ARGS, "sched.name=cosine", "sched.warmup_steps=10", "train.log_every=1"]
    check_ok(launch([*args, "run.dir=reference"], workdir, nproc=2))
    # Step 30 is the 8th step of epoch 2; the newest checkpoint is step 25's.
    result = check_ok(launch([*args, "run.dir=run"], workdir, nproc=2, torchrun_args=["--max-restarts=1"],
                             env={**without_credentials(workdir), "INTERRUPT": "1:30:SIGKILL"}))
    assert "resumed from run/checkpoints/step_000000025.pt: epoch 2, step 3 of it, global step 25" in result.stdout
    assert_identical(load_weights(workdir / "run"), load_weights(workdir / "reference"))
    lrs = [[(r["step"], r["lr/group0"]) for r in read_metrics(workdir / run) if "lr/group0" in r]
           for run in ("reference", "run")]
    assert lrs[0] == lrs[1] and [step for step, _ in lrs[0]] == list(range(1, 67))  # each step once, in order
    assert lrs[0][0][1] == pytest.approx(0.05 * 2 / 10)  # warmup: after step 1 the 2nd of 10 warmup steps begins

    first, second = (wandb_records(run) for run in offline_runs(workdir / "run"))  # one per attempt
    assert run_id(first) == run_id(second)
    steps = [row["_step"] for row in history(first) + history(second)]
    assert steps == sorted(set(steps)) and steps[-1] == 66, steps
    assert "eval/accuracy" in history(second)[-1]


def test_a_resume_on_fewer_processes_logs_the_epoch_loss_of_an_uninterrupted_run(tmp_path):
    """2 processes stopped at step 33 (11 steps into epoch 2), continued on 1: the epoch's loss counts its first 11
    steps, as run on 2 processes, and the rest (digits has no dropout: 1 and 2 processes train alike)."""
    common = ["recipe=digits", "wandb.mode=disabled", "train.epochs=2"]
    check_ok(launch([*common, "run.dir=whole"], tmp_path, nproc=2))
    check_ok(launch([*common, "run.dir=split", "train.max_steps=33"], tmp_path, nproc=2))
    resumed = check_ok(launch([*common, "run.dir=split"], tmp_path))
    assert "resuming on 1 processes from a checkpoint of 2" in resumed.stdout
    whole, split = epoch_records(tmp_path / "whole")[-1], epoch_records(tmp_path / "split")[-1]
    assert whole["epoch"] == split["epoch"] == 2 and whole["step"] == split["step"] == 44
    assert split["train/loss"] == pytest.approx(whole["train/loss"], rel=1e-5)


def test_a_kill_while_writing_a_checkpoint_leaves_the_previous_one_to_resume_from(workdir):
    reference = reference_weights(workdir)
    result = check_ok(launch(
        [*ARGS, "run.dir=run"], workdir, nproc=2, env={"KILL_IN_SAVE": "3"}, torchrun_args=["--max-restarts=1"]
    ))
    assert "resumed from run/checkpoints/step_000000010.pt" in result.stdout  # the 2nd save; the 3rd was torn
    assert_identical(load_weights(workdir / "run"), reference)
    assert not list((workdir / "run" / "checkpoints").glob(".*.tmp"))  # the torn file was cleaned up


def test_a_truncated_newest_checkpoint_is_skipped_with_a_warning(workdir):
    reference = reference_weights(workdir, nproc=None)
    check_ok(launch([*ARGS, "run.dir=run", "train.epochs=2"], workdir))
    newest = workdir / "run" / "checkpoints" / "step_000000044.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    result = check_ok(launch([*ARGS, "run.dir=run", "train.epochs=3"], workdir))  # longer than before: allowed
    warnings = [line for line in result.stdout.splitlines() if "is unreadable" in line]
    assert len(warnings) == 1 and "step_000000044.pt" in warnings[0]
    assert "resumed from run/checkpoints/step_000000040.pt" in result.stdout
    assert_identical(load_weights(workdir / "run"), reference)


def test_retention_keeps_the_newest_and_the_best_and_everything_loads_weights_only(workdir):
    check_ok(launch([*ARGS, "run.dir=run", "ckpt.keep=2", "ckpt.best_metric=eval/accuracy"], workdir, nproc=2))
    folder = workdir / "run" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["best.pt", "step_000000065.pt", "step_000000066.pt"]
    best = torch.load(folder / "best.pt", weights_only=True)
    assert best["best"] == max(record["eval/accuracy"] for record in epoch_records(workdir / "run"))
    last = torch.load(folder / "step_000000066.pt", weights_only=True)
    expected = {"model", "optimizer", "epoch", "samples_in_epoch", "global_step", "rank_states", "config", "versions"}
    assert expected <= set(last)
    assert len(last["rank_states"]) == 2 and set(last["rank_states"][1]["rng"]) == {"torch", "cuda", "python", "numpy"}
    assert last["config"]["ckpt"]["keep"] == 2 and last["versions"]["torch"] == str(torch.__version__)
    assert not any(key.startswith("module.") for key in last["model"])


def test_resuming_into_a_model_the_recipe_code_changed_names_the_first_mismatch(tmp_path):
    # The config is the same; the recipe's code now builds another model.
    (tmp_path / "grown.py").write_text(textwrap.dedent("""
        import os
        from torch import nn
        import launcher.recipes.digits as digits
        from launcher.recipes.digits import DEFAULTS, build_datasets

        def build_model(cfg):
            if not os.environ.get("GROWN"):
                return digits.build_model(cfg)
            return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.Flatten(), nn.Linear(1024, 10))
    """))
    check_ok(launch(["recipe=grown.py", "run.dir=run", "train.epochs=1", "wandb.mode=disabled"], tmp_path))
    result = launch(["recipe=grown.py", "run.dir=run", "train.epochs=2", "wandb.mode=disabled"], tmp_path,
                    env={"GROWN": "1"})
    assert result.returncode == 2, result.stderr
    assert "'0.weight' is [32, 1, 3, 3] there but [16, 1, 3, 3] in the model this config builds" in result.stderr


def test_eval_only_evaluates_a_checkpoint_or_model_pt(tmp_path):
    check_ok(launch(["recipe=digits", "run.dir=run", "train.epochs=2"], tmp_path))
    last = epoch_records(tmp_path / "run")[-1]
    expected = f"eval/loss {last['eval/loss']:.4f} | eval/accuracy {last['eval/accuracy']:.4f}"
    from_model = check_ok(launch(["recipe=digits", "eval.only=true", "ckpt.resume=run/model.pt"], tmp_path, nproc=2))
    assert f"evaluated run/model.pt | {expected}" in from_model.stdout
    sharded = ["recipe=digits", "eval.only=true", "run.dir=run", "eval.sharded=true"]
    from_run = check_ok(launch(sharded, tmp_path, nproc=2))
    assert f"evaluated run/checkpoints/step_000000044.pt | {expected}" in from_run.stdout


