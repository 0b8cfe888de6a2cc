"""dist.strategy=fsdp on 2 CPU processes (gloo): the same training as DDP, sharded checkpoints that resume exactly,
on another number of processes, and convert to model.pt; evaluation on every rank."""

import subprocess
import sys

import pytest
import torch
from helpers import GPT_RECIPE, assert_identical, check_ok, epoch_records, launch, load_weights

from launcher.cli.main import load_validated
from launcher.distributed.env import DistEnv
from launcher.distributed.strategy import strategy_for
from launcher.engine.build import build_model_and_data
from launcher.engine.evaluate import evaluate

FSDP = "dist.strategy=fsdp"
ONE_PROCESS, CPU = DistEnv.from_environ({}), torch.device("cpu")


def max_difference(one: dict, two: dict) -> float:
    assert one.keys() == two.keys()
    return max((one[key].float() - two[key].float()).abs().max().item() for key in one)


def assert_same_training(ddp: dict, fsdp: dict, initial: dict) -> None:
    """FSDP's weights equal DDP's within float32 rounding, while training moved them by far more.

    The first step is bitwise equal (the gpt test checks it). After it the two differ only in the order of float
    additions: FSDP reduce-scatters gradients that DDP all-reduces in buckets, and the clipping norm is summed from
    per-shard norms. Measured here: 9e-8 after 12 steps and 1.6e-7 after 18 (gpt, AdamW), 1.5e-8 after 12 (mlp,
    SGD with momentum); 1e-5 leaves a margin of 60x, and is still 100x below how far 12 steps move the weights.
    """
    assert max_difference(ddp, fsdp) < 1e-5
    assert max_difference(ddp, initial) > 1e-3


@pytest.fixture
def gpt_dir(tmp_path):
    (tmp_path / "small_gpt.py").write_text(GPT_RECIPE)
    return tmp_path


def test_gpt_under_fsdp_trains_evaluates_checkpoints_and_resumes_on_one_process_as_ddp_does(gpt_dir):
    """Accumulation and clipping; eval on every rank equals eval without FSDP; the sharded checkpoint converts to
    the model's weights and resumes on 1 process, where both strategies continue alike."""
    args = ["recipe=small_gpt.py", "wandb.mode=disabled", "train.grad_accum=2", "train.clip_grad_norm=0.5",
            "ckpt.every_steps=6"]
    check_ok(launch([*args, "run.dir=ddp", "train.max_steps=1"], gpt_dir, nproc=2))
    check_ok(launch([*args, "run.dir=fsdp", "train.max_steps=1", FSDP], gpt_dir, nproc=2))
    first_step = load_weights(gpt_dir / "ddp"), load_weights(gpt_dir / "fsdp")
    assert_identical(*first_step)

    # Continued to step 12 (a changed max_steps continues a run): checkpoints at 6 and 12.
    check_ok(launch([*args, "run.dir=ddp", "train.max_steps=12"], gpt_dir, nproc=2))
    trained = check_ok(launch([*args, "run.dir=fsdp", "train.max_steps=12", FSDP], gpt_dir, nproc=2))
    assert "fsdp: 2 blocks sharded one by one (Block), then the root" in trained.stdout
    assert_same_training(load_weights(gpt_dir / "ddp"), load_weights(gpt_dir / "fsdp"),
                         built_here([f"recipe={gpt_dir / 'small_gpt.py'}"])[0].state_dict())
    checkpoint = gpt_dir / "fsdp" / "checkpoints" / "step_000000012"
    assert sorted(path.name for path in checkpoint.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp",
                                                                  "launcher.pt"]

    # Evaluated on both ranks, sharded: exactly the numbers of the same weights evaluated in one process without
    # FSDP (and, to 4 places, what eval.only prints for them).
    (record,) = [r for r in epoch_records(gpt_dir / "fsdp") if r["step"] == 12]
    assert {key: value for key, value in record.items() if key.startswith("eval/")} == evaluated_here(
        gpt_dir, load_weights(gpt_dir / "fsdp"))
    evaluated = check_ok(launch([*args, "run.dir=fsdp", "eval.only=true", "ckpt.resume=fsdp/model.pt"], gpt_dir))
    assert f"eval/perplexity {record['eval/perplexity']:.4f}" in evaluated.stdout

    # The command that converts a sharded checkpoint gives the weights model.pt has.
    converted = check_ok(launch_convert([str(checkpoint), "--out", "converted.pt"], gpt_dir))
    assert "converted.pt" in converted.stdout
    assert_identical(torch.load(gpt_dir / "converted.pt", weights_only=True), load_weights(gpt_dir / "fsdp"))

    # On 1 process, from the 2 processes' checkpoint (DCP reshards), and DDP from its own: alike again.
    resumed = check_ok(launch([*args, "run.dir=fsdp", "train.max_steps=18", FSDP], gpt_dir))
    assert "resumed from fsdp/checkpoints/step_000000012: epoch 1, step 12 of it" in resumed.stdout
    assert "resuming on 1 processes from a checkpoint of 2" in resumed.stdout
    check_ok(launch([*args, "run.dir=ddp", "train.max_steps=18"], gpt_dir))
    assert max_difference(load_weights(gpt_dir / "ddp"), load_weights(gpt_dir / "fsdp")) < 1e-5


def launch_convert(args: list[str], cwd):
    return subprocess.run([sys.executable, "-m", "launcher.convert", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def built_here(args: list[str]):
    """(the model as a run with ``args`` starts, its eval set, the recipe, the config), built in this process."""
    _, recipe, cfg = load_validated([*args, "wandb.mode=disabled"], ONE_PROCESS)
    model, _, eval_set = build_model_and_data(cfg, recipe, ONE_PROCESS, CPU)
    return model, eval_set, recipe, cfg


def evaluated_here(gpt_dir, weights: dict) -> dict:
    """The recipe's evaluation of ``weights`` in this process, one thread (as each launcher process computes)."""
    model, eval_set, recipe, cfg = built_here([f"recipe={gpt_dir / 'small_gpt.py'}"])
    model.load_state_dict(weights)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return evaluate(model, eval_set, recipe, cfg, strategy_for(cfg, ONE_PROCESS, CPU))
    finally:
        torch.set_num_threads(threads)


def test_mlp_under_fsdp_with_accumulation_and_clipping_ends_with_ddps_weights(tmp_path, fashion_root):
    args = ["recipe=mlp", f"data.root={fashion_root}", "wandb.mode=disabled", "train.batch_size=32",
            "train.grad_accum=2", "train.clip_grad_norm=0.05", "train.max_steps=12", "optim.momentum=0.9"]
    check_ok(launch([*args, "run.dir=ddp"], tmp_path, nproc=2))
    check_ok(launch([*args, "run.dir=fsdp", FSDP], tmp_path, nproc=2))
    assert_same_training(load_weights(tmp_path / "ddp"), load_weights(tmp_path / "fsdp"),
                         built_here(args)[0].state_dict())


def test_gpt_under_fsdp_after_a_sigkill_mid_epoch_then_a_kill_in_a_checkpoint_write_ends_bitwise_identical(gpt_dir):
    # Half the recipe's data: 16 steps an epoch, 2 eval batches per rank; rank 1's 24th step call is step 22.
    args = ["recipe=small_gpt.py", "wandb.mode=disabled", "ckpt.every_steps=5", "data.train_bytes=33000", FSDP]
    check_ok(launch([*args, "run.dir=reference"], gpt_dir, nproc=2))
    # Rank 1 killed in step 22: the restart resumes from step 20's folder. Then rank 0 killed in the restarted
    # group's 2nd checkpoint write (step 30), after every rank wrote its shards: the second restart resumes from
    # step 25's, and the next save clears the torn folder.
    result = check_ok(launch([*args, "run.dir=run"], gpt_dir, nproc=2, torchrun_args=["--max-restarts=2"],
                             env={"INTERRUPT": "1:24:SIGKILL", "KILL_IN_SHARD_SAVE": "2"}))
    resumed = [line.split(", global")[0] for line in result.stdout.splitlines() if line.startswith("resumed from")]
    assert resumed == ["resumed from run/checkpoints/step_000000020: epoch 2, step 4 of it",
                       "resumed from run/checkpoints/step_000000025: epoch 2, step 9 of it"]
    assert_identical(load_weights(gpt_dir / "run"), load_weights(gpt_dir / "reference"))
    kept = sorted(path.name for path in (gpt_dir / "run" / "checkpoints").iterdir())
    assert kept == ["step_000000025", "step_000000030", "step_000000032"]  # ckpt.keep=3 folders, no temporaries

    # A finished run whose model.pt was lost writes it again from its newest folder (on rank 0, alone).
    (gpt_dir / "run" / "model.pt").unlink()
    again = check_ok(launch([*args, "run.dir=run"], gpt_dir, nproc=2))
    assert "run.dir run is complete: 32 steps" in again.stdout
    assert_identical(load_weights(gpt_dir / "run"), load_weights(gpt_dir / "reference"))
