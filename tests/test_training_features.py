"""Gradient accumulation, clipping, LR schedules, max_steps and limit_eval_batches."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from conftest import check_ok, epoch_records, launch, load_weights, read_metrics
from launcher.config import build_config, parse_overrides
from launcher.data import build_train_loader
from launcher.dist_env import DistEnv
from launcher.precision import Precision
from launcher.recipe import load_recipe
from launcher.schedule import lr_multiplier
from launcher.stop import GracefulStop, StopSignals
from launcher.train import TrainState, run_steps
from test_checkpoint import ARGS, RECIPE


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


def _count_all_reduces(rank: int, store_file: str, accum: int, counts) -> None:
    """One of two processes: train one digits epoch with the engine's loop, counting DDP's all-reduces."""
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=2)
    recipe, dist_env = load_recipe("digits"), DistEnv(rank=rank, world_size=2, local_world_size=2)
    overrides = parse_overrides(["train.batch_size=32", f"train.grad_accum={accum}", "train.log_every=1000"])
    cfg = build_config(recipe.defaults, {}, overrides, "digits")
    model = recipe.build_model(cfg)
    ddp_model = DistributedDataParallel(model, bucket_cap_mb=1000)  # one bucket: one all-reduce per sync
    calls = []
    ddp_model.register_comm_hook(None, lambda state, bucket: calls.append(1) or allreduce_hook(None, bucket))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    loader = build_train_loader(recipe.build_datasets(cfg)[0], cfg, dist_env, torch.device("cpu"))
    precision = Precision("none", False, torch.device("cpu"))
    state = TrainState(ddp_model, model, optimizer, scheduler, precision, recipe.loss, recipe.predictions, loader,
                       None, torch.device("cpu"))
    stop = GracefulStop(dist_env, StopSignals(dist_env))
    run_steps(state, cfg, dist_env, None, None, stop)
    stop.close()
    counts[rank] = (len(calls), state.global_step)
    dist.destroy_process_group()


@pytest.mark.parametrize("accum", [1, 4])
def test_one_all_reduce_per_optimizer_step_however_many_micro_batches(tmp_path, accum):
    counts = mp.Manager().dict()
    mp.spawn(_count_all_reduces, args=(str(tmp_path / "store"), accum, counts), nprocs=2)
    assert counts[0] == counts[1] == (44, 44)  # 1,437 samples // 32 = 44 steps, each one all-reduce


def test_the_learning_rate_after_an_elastic_restart_is_the_uninterrupted_one(tmp_path):
    (tmp_path / "interruptible.py").write_text(RECIPE)
    args = [*ARGS, "sched.name=cosine", "sched.warmup_steps=10", "train.log_every=1", "wandb.mode=disabled"]
    check_ok(launch([*args, "run.dir=reference"], tmp_path, nproc=2))
    check_ok(launch([*args, "run.dir=run"], tmp_path, nproc=2, env={"INTERRUPT": "1:30:SIGKILL"},
                    torchrun_args=["--max-restarts=1"]))
    lrs = [{r["step"]: r["lr/group0"] for r in read_metrics(tmp_path / run) if "lr/group0" in r}
           for run in ("reference", "run")]
    assert lrs[0] == lrs[1] and len(lrs[0]) == 66
    assert lrs[0][1] == pytest.approx(0.05 * 2 / 10)  # warmup: after step 1 the 2nd of 10 warmup steps begins
    reference, resumed = load_weights(tmp_path / "reference"), load_weights(tmp_path / "run")
    assert all(torch.equal(reference[key], resumed[key]) for key in reference)


def test_max_steps_and_limit_eval_batches_make_a_smoke_run(tmp_path):
    check_ok(launch(["recipe=digits", "run.dir=run", "train.max_steps=5", "train.limit_eval_batches=1",
                     "eval.batch_size=50", "wandb.mode=disabled"], tmp_path))
    (record,) = epoch_records(tmp_path / "run")
    assert record["step"] == 5 and round(record["eval/accuracy"] * 50) == record["eval/accuracy"] * 50
    assert (tmp_path / "run" / "checkpoints" / "step_000000005.pt").exists()


def test_schedule_shapes():
    def lrs(overrides, total=100):
        cfg = build_config({}, {}, parse_overrides(overrides), "test")
        return [lr_multiplier(cfg, total)(step) for step in range(total + 1)]

    assert set(lrs(["sched.name=constant"])) == {1.0}
    warm = lrs(["sched.name=constant", "sched.warmup_steps=4"])
    assert warm[:5] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lrs(["sched.name=step", "sched.step_size=10", "sched.gamma=0.5"])[25] == 0.25
    cosine = lrs(["sched.name=cosine", "sched.min_lr_ratio=0.1"])
    assert cosine[0] == 1.0 and cosine[50] == pytest.approx(0.55) and cosine[100] == pytest.approx(0.1)
    onecycle = lrs(["sched.name=onecycle"])
    assert onecycle.index(max(onecycle)) == 29 and onecycle[100] == pytest.approx(0.0, abs=1e-9)
    assert math.isclose(onecycle[0], 1 / 30)
