"""Activation checkpointing and tensor parallel on real processes (gloo, CPU): training bitwise as without
checkpointing under DDP and FSDP (compiled too), and a 2-D mesh (FSDP across, TP within) that trains as one process
does, resumes bitwise after a SIGKILL, and continues on another mesh."""

import pytest
from helpers import GPT_RECIPE, assert_identical, assert_user_error, check_ok, launch, load_weights

from launcher.checkpoint.formats import FOLDER


@pytest.fixture
def gpt_dir(tmp_path):
    (tmp_path / "small_gpt.py").write_text(GPT_RECIPE)
    return tmp_path


def max_difference(one: dict, two: dict) -> float:
    assert one.keys() == two.keys()
    return max((one[key].float() - two[key].float()).abs().max().item() for key in one)


def test_activation_checkpointing_trains_bitwise_as_without_it_under_ddp_and_compiled_fsdp(gpt_dir):
    """With dropout its masks are drawn again in the recompute, from the same random state. (Compiled, inductor draws
    dropout its own way in each graph: bitwise there without dropout; the in-process test covers every mode.)"""
    ddp = ["recipe=small_gpt.py", "wandb.mode=disabled", "train.max_steps=6", "model.dropout=0.1"]
    check_ok(launch([*ddp, "run.dir=ddp"], gpt_dir, nproc=2))
    checkpointed = check_ok(launch([*ddp, "run.dir=ddp-ac", "train.activation_checkpointing=full"], gpt_dir, nproc=2))
    assert "activation checkpointing (full): 2 of 2 blocks recompute their forward in backward" in checkpointed.stdout
    assert_identical(load_weights(gpt_dir / "ddp-ac"), load_weights(gpt_dir / "ddp"))

    # One process: compiling is most of this test's time, and sharding over two is the DDP part's and the TP test's.
    fsdp = ["recipe=small_gpt.py", "wandb.mode=disabled", "train.max_steps=6", "dist.strategy=fsdp",
            "train.compile=true"]
    check_ok(launch([*fsdp, "run.dir=fsdp"], gpt_dir))
    check_ok(launch([*fsdp, "run.dir=fsdp-ac", "train.activation_checkpointing=2"], gpt_dir))
    assert_identical(load_weights(gpt_dir / "fsdp-ac"), load_weights(gpt_dir / "fsdp"))


# SGD: AdamW divides each gradient by its own running size, which makes the rounding of near-zero gradients (summed
# in another order across a tensor-parallel group) a step of the learning rate's size. Steps 1-14 stay inside the
# warmup, whose rate does not depend on train.max_steps: a run continued from step 10 to 14 trains as one to 14.
TP_ARGS = ["recipe=small_gpt.py", "wandb.mode=disabled", "dist.strategy=fsdp", "optim.name=sgd", "optim.lr=3.0",
           "optim.momentum=0.9", "ckpt.every_steps=5", "ckpt.keep=4", "train.max_steps=10"]


def test_tensor_parallel_trains_as_one_process_resumes_bitwise_and_continues_on_another_mesh(gpt_dir):
    """Measured here: 2e-8 between TP=2 and one process after 10 steps, which moved the weights by 0.1."""
    check_ok(launch([*TP_ARGS, "run.dir=one", "train.max_steps=14"], gpt_dir))
    one_at_10 = FOLDER.weights(gpt_dir / "one" / "checkpoints" / "step_000000010", {})
    one_at_14 = load_weights(gpt_dir / "one")

    split = check_ok(launch([*TP_ARGS, "run.dir=tp", "dist.tp=2"], gpt_dir, nproc=2))
    assert "on a 1 x 2 mesh (data parallel x tensor parallel)" in split.stdout
    assert max_difference(load_weights(gpt_dir / "tp"), one_at_10) < 1e-5 < max_difference(one_at_10, one_at_14)

    # 2 x 2: rank 3 killed in its 7th step, torchrun starts the group again, which resumes from step 5's folder and
    # ends where one process does (a shard restored into the wrong place would not; test_fsdp.py checks sharded
    # resumes bitwise).
    killed = check_ok(launch([*TP_ARGS, "dist.tp=2", "run.dir=mesh"], gpt_dir, nproc=4,
                             torchrun_args=["--max-restarts=1"], env={"INTERRUPT": "3:7:SIGKILL"}))
    assert "resumed from mesh/checkpoints/step_000000005" in killed.stdout
    assert max_difference(load_weights(gpt_dir / "mesh"), one_at_10) < 1e-5

    # Continued on other meshes from step 10's folders: TP 2 -> 1 (one process), and 4 processes (2 x 2) -> 2 (2 x 1).
    check_ok(launch([*TP_ARGS, "run.dir=tp", "train.max_steps=14"], gpt_dir))
    check_ok(launch([*TP_ARGS, "run.dir=mesh", "train.max_steps=14"], gpt_dir, nproc=2))
    for continued in ("tp", "mesh"):
        assert max_difference(load_weights(gpt_dir / continued), one_at_14) < 1e-5, continued


def test_a_mesh_the_processes_cannot_fill_is_one_line(gpt_dir):
    refused = launch(["recipe=small_gpt.py", "dist.strategy=fsdp", "dist.tp=3", "dist.nproc_per_node=2"], gpt_dir)
    assert_user_error(refused, "dist.tp=3 does not divide the 2 processes into tensor-parallel groups")
    assert not (gpt_dir / "runs").exists()
