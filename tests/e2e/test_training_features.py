"""Gradient accumulation, clipping, LR schedules, max_steps and limit_eval_batches."""


import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import check_ok, epoch_records, launch, load_weights, read_metrics
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from launcher.config.build import build_config, freeze, parse_overrides
from launcher.distributed.env import DistEnv
from launcher.distributed.stop import StopSignals
from launcher.engine.trainer import Trainer
from launcher.recipe import load_recipe


def test_accumulating_micro_batches_gives_the_weights_of_the_whole_batch(tmp_path):
    # 2 processes x 8 samples x 2 micro-batches against 2 processes x 16 samples: the same global batch of 32.
    common = ["recipe=digits", "train.epochs=1", "train.batch_size=32", "train.clip_grad_norm=1.0",
              "train.log_every=5", "wandb.mode=disabled"]
    accumulated = check_ok(launch([*common, "train.grad_accum=2", "run.dir=accum"], tmp_path, nproc=2))
    check_ok(launch([*common, "run.dir=whole"], tmp_path, nproc=2))
    assert "batch 32 global, 8 per rank x 2 accumulated" in accumulated.stdout
    accum, whole = load_weights(tmp_path / "accum"), load_weights(tmp_path / "whole")
    for key in whole:
        torch.testing.assert_close(accum[key], whole[key], rtol=1e-5, atol=1e-6)
    assert all("grad_norm" in r for r in read_metrics(tmp_path / "accum") if "time/epoch_s" not in r)


def _count_all_reduces(rank: int, tmp_path, accum: int, counts) -> None:
    """One of two processes: train one digits epoch with the engine's Trainer, counting DDP's all-reduces."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=rank, world_size=2)
    recipe, dist_env = load_recipe("digits"), DistEnv(rank=rank, world_size=2, local_world_size=2)
    overrides = parse_overrides(["train.batch_size=32", f"train.grad_accum={accum}", "train.log_every=1000",
                                 "dist.bucket_cap_mb=1000", "wandb.mode=disabled", f"run.dir={tmp_path / 'run'}"])
    cfg = freeze(build_config(recipe.defaults, {}, overrides, "digits"))
    trainer = Trainer.build(cfg, recipe, dist_env, torch.device("cpu"), StopSignals(dist_env))
    calls = []  # one bucket (bucket_cap_mb=1000): one all-reduce per gradient sync
    count_and_reduce = lambda state, bucket: calls.append(1) or allreduce_hook(None, bucket)  # noqa: E731
    trainer.wrapped_model.register_comm_hook(None, count_and_reduce)
    trainer.run_epoch()
    trainer.close("finished")
    counts[rank] = (len(calls), trainer.position.global_step)
    dist.destroy_process_group()


@pytest.mark.parametrize("accum", [1, 4])
def test_one_all_reduce_per_optimizer_step_however_many_micro_batches(tmp_path, accum):
    counts = mp.Manager().dict()
    mp.spawn(_count_all_reduces, args=(tmp_path, accum, counts), nprocs=2)
    assert counts[0] == counts[1] == (44, 44)  # 1,438 samples // 32 = 44 steps, each one all-reduce


def test_max_steps_and_limit_eval_batches_make_a_smoke_run(tmp_path):
    check_ok(launch(["recipe=digits", "run.dir=run", "train.max_steps=5", "train.limit_eval_batches=1",
                     "eval.batch_size=50", "wandb.mode=disabled"], tmp_path))
    (record,) = epoch_records(tmp_path / "run")
    assert record["step"] == 5 and round(record["eval/accuracy"] * 50) == record["eval/accuracy"] * 50
    assert (tmp_path / "run" / "checkpoints" / "step_000000005.pt").exists()


