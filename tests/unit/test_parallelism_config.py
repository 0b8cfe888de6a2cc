"""Activation checkpointing and the strategies' config in this process: every mode trains bitwise as without it, and
what cannot run is one line before anything starts. The multi-process versions are in tests/e2e/test_parallelisms.py."""

import pytest
import torch
from helpers import GPT_RECIPE, assert_identical, load_weights
from helpers import build_trainer as build

from launcher.cli.main import load_validated
from launcher.distributed.env import DistEnv
from launcher.errors import UserError
from launcher.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("trainer_dir")


def trained(mode: str, *overrides: str) -> dict:
    """The small gpt with dropout after 4 steps, its blocks checkpointed as ``mode`` says."""
    run = f"run.dir=ac-{mode}"
    trainer = build(run, "model.dropout=0.1", "train.max_steps=4", f"train.activation_checkpointing={mode}",
                    *overrides, recipe="small_gpt.py")
    trainer.run()
    return load_weights(f"ac-{mode}")


def test_every_activation_checkpointing_mode_trains_bitwise_as_without_it(trainer_dir):
    (trainer_dir / "small_gpt.py").write_text(GPT_RECIPE)
    without = trained("off")
    for mode in ("full", "op", "2"):
        assert_identical(trained(mode), without)


def test_activation_checkpointing_of_a_model_without_blocks_is_one_line():
    with pytest.raises(UserError, match="train.activation_checkpointing=full needs the model's repeated blocks"):
        build("train.activation_checkpointing=full")
    with pytest.raises(UserError, match="train.activation_checkpointing=0 must be off, full, op, or a whole number"):
        build("train.activation_checkpointing=0")


def validated(*overrides: str):
    return load_validated(["recipe=gpt", "dist.strategy=fsdp", *overrides], DistEnv())


def test_a_mesh_the_processes_cannot_fill_is_refused_before_anything_starts():
    with pytest.raises(UserError, match="dist.tp=3 does not divide the 2 processes into tensor-parallel groups"):
        validated("dist.nproc_per_node=2", "dist.tp=3")
    with pytest.raises(UserError, match="dist.tp=2 splits each block over processes within FSDP: set "
                                        "dist.strategy=fsdp too"):
        validated("dist.nproc_per_node=2", "dist.tp=2", "dist.strategy=ddp")
    with pytest.raises(UserError, match="must split evenly over 2 groups of dist.tp=2 processes: use a multiple of 2"):
        validated("dist.nproc_per_node=4", "dist.tp=2", "train.batch_size=31")
    validated("dist.nproc_per_node=4", "dist.tp=2", "train.batch_size=30")


def test_tensor_parallel_needs_the_recipes_plan_and_heads_it_can_split():
    _, recipe, cfg = validated("dist.nproc_per_node=2", "dist.tp=2")
    model = recipe.build_model(cfg)
    plan = recipe.tp_plan(model, cfg)
    assert sorted(plan) == ["blocks.*.attention.k", "blocks.*.attention.out", "blocks.*.attention.q",
                            "blocks.*.attention.v", "blocks.*.mlp.0", "blocks.*.mlp.2"]
    assert all(any(name.endswith(key.split("*.")[1]) for name, _ in model.named_modules()) for key in plan)
    with pytest.raises(UserError, match="dist.tp=2 splits the model's blocks over processes, and recipe mlp says "
                                        "not how: give it tp_plan"):
        load_recipe("mlp").tp_plan(torch.nn.Linear(1, 1), cfg)
    _, _, odd = validated("dist.nproc_per_node=4", "dist.tp=4", "model.heads=6", "model.width=48")
    with pytest.raises(ValueError, match="model.heads=6 does not split over dist.tp=4 processes"):
        recipe.tp_plan(model, odd)
