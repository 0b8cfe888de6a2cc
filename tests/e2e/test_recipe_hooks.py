"""Recipes beyond (input, target) pairs, in real processes: dict batches with a collate of the recipe's own, a
custom step, custom metrics (sharded evaluation equal to rank 0's exactly, a best checkpoint chosen by one),
SyncBatchNorm on 1 and 2 processes, the gpt recipe (1 vs 2 processes), and hooks that return what cannot be trained
on (one line, exit 2)."""

import textwrap

import pytest
import torch
from helpers import GPT_RECIPE, assert_user_error, assert_weights, check_ok, epoch_records, launch, load_weights

# Digits as dict samples with a non-tensor leaf, batched by the recipe's own collate, a step that reads the dict,
# and a top-2 accuracy as a sum and a count.
DICT_RECIPE = textwrap.dedent("""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import Dataset
    from launcher.recipes import digits

    DEFAULTS = {**digits.DEFAULTS, "train": {"epochs": 3, "batch_size": 64}}
    build_model = digits.build_model

    class Named(Dataset):
        def __init__(self, pairs):
            self.pairs = pairs
        def __len__(self):
            return len(self.pairs)
        def __getitem__(self, index):
            image, label = self.pairs[index]
            return {"pixels": {"image": image}, "label": label, "name": f"digit-{index}"}

    def build_datasets(cfg):
        train, evaluation = digits.build_datasets(cfg)
        return Named(train), Named(evaluation)

    def collate(samples):
        return {"pixels": {"image": torch.stack([s["pixels"]["image"] for s in samples])},
                "label": torch.stack([s["label"] for s in samples]), "names": [s["name"] for s in samples]}

    def step(model, batch):
        assert batch["names"][0].startswith("digit-")  # non-tensor leaves arrive as they are
        logits = model(batch["pixels"]["image"])
        return F.cross_entropy(logits, batch["label"]), logits

    def metrics(logits, batch):
        top2 = logits.topk(2, dim=1).indices
        hits = (top2 == batch["label"].unsqueeze(1)).any(dim=1).sum()
        return {"top2": (hits, len(batch["label"])), "errors": (len(batch["label"]) - hits, 1)}
""")

BATCHNORM_RECIPE = textwrap.dedent("""
    from torch import nn
    from launcher.recipes.digits import build_datasets

    DEFAULTS = {"train": {"epochs": 2, "batch_size": 32}, "optim": {"lr": 0.05, "momentum": 0.9},
                "data": {"eval_fraction": 0.2}}

    def build_model(cfg):
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                             nn.Linear(8 * 64, 10))
""")

def test_dict_batches_a_custom_step_and_custom_metrics_sharded_or_not_best_by_a_custom_metric(tmp_path):
    (tmp_path / "named.py").write_text(DICT_RECIPE)
    args = ["recipe=named.py", "ckpt.best_metric=eval/top2", "wandb.mode=disabled", "eval.batch_size=50"]
    one = check_ok(launch([*args, "run.dir=one"], tmp_path))
    check_ok(launch([*args, "run.dir=rank0"], tmp_path, nproc=2))
    check_ok(launch([*args, "run.dir=sharded", "eval.sharded=true"], tmp_path, nproc=2))
    records = {run: epoch_records(tmp_path / run) for run in ("one", "rank0", "sharded")}
    metrics = [{key: value for key, value in record.items() if key.startswith("eval/")}
               for record in records["rank0"]]
    assert metrics == [{key: value for key, value in record.items() if key.startswith("eval/")}
                       for record in records["sharded"]]  # exactly: each batch's sums added in batch order
    assert set(metrics[0]) == {"eval/loss", "eval/top2", "eval/errors"}  # the recipe's metrics replace accuracy
    for record in metrics:  # 359 eval samples: top2 is a count of them, errors the misses (summed, counted per batch)
        hits = round(record["eval/top2"] * 359)
        assert record["eval/top2"] == hits / 359 and record["eval/errors"] == (359 - hits) / 8
    assert metrics[-1]["eval/top2"] > 0.9 and "eval top2" in one.stdout
    assert_weights(load_weights(tmp_path / "one"), load_weights(tmp_path / "rank0"), equal=True)
    best_epoch = max(records["rank0"], key=lambda record: record["eval/top2"])  # the first of equals
    best = torch.load(tmp_path / "rank0" / "checkpoints" / "best.pt", weights_only=True)
    assert best["best"] == best_epoch["eval/top2"] and best["global_step"] == best_epoch["step"]


def test_sync_batchnorm_makes_two_processes_train_like_one(tmp_path):
    (tmp_path / "bn.py").write_text(BATCHNORM_RECIPE)
    args = ["recipe=bn.py", "wandb.mode=disabled"]
    check_ok(launch([*args, "run.dir=one"], tmp_path))
    check_ok(launch([*args, "run.dir=two_sync", "dist.sync_batchnorm=true"], tmp_path, nproc=2))
    check_ok(launch([*args, "run.dir=two_local"], tmp_path, nproc=2))
    one = load_weights(tmp_path / "one")
    # Synchronised: the statistics of the global batch of 32, as on one process (running stats included).
    assert_weights(one, load_weights(tmp_path / "two_sync"), equal=True, rtol=1e-4, atol=1e-5)
    # Not: each rank normalises its own 16 samples, so the same run on 2 processes is a different computation.
    assert_weights(one, load_weights(tmp_path / "two_local"), equal=False, rtol=1e-4, atol=1e-5)
    # Sharded, synchronised: as on one process too. Sharded without it is refused (each rank's statistics would
    # stay its own: FSDP does not copy rank 0's buffers as DDP does).
    fsdp = ["dist.strategy=fsdp"]
    check_ok(launch([*args, *fsdp, "run.dir=fsdp_sync", "dist.sync_batchnorm=true"], tmp_path, nproc=2))
    assert_weights(one, load_weights(tmp_path / "fsdp_sync"), equal=True, rtol=1e-4, atol=1e-5)
    assert_user_error(launch([*args, *fsdp, "run.dir=fsdp_local"], tmp_path, nproc=2),
                      "dist.strategy=fsdp with BatchNorm layers needs dist.sync_batchnorm=true", torchrun=True)


def test_gpt_on_one_and_two_processes_ends_with_the_same_weights(tmp_path):
    (tmp_path / "small_gpt.py").write_text(GPT_RECIPE)
    args = ["recipe=small_gpt.py", "wandb.mode=disabled"]
    one = check_ok(launch([*args, "run.dir=one"], tmp_path))
    check_ok(launch([*args, "run.dir=two"], tmp_path, nproc=2))
    assert_weights(load_weights(tmp_path / "one"), load_weights(tmp_path / "two"), equal=True, atol=1e-5)
    first, last = epoch_records(tmp_path / "one")
    assert last["eval/loss"] < first["eval/loss"] < 5.55  # below a uniform guess over 256 bytes, ln 256
    assert last["eval/perplexity"] == pytest.approx(torch.tensor(last["eval/loss"]).exp().item(), rel=1e-6)
    assert "tokens/s" in one.stdout and last["throughput/tokens_per_s"] == last["throughput/samples_per_s"] * 64


# A hook that returns what cannot be trained on or counted: one line naming the hook and what it returned, exit 2
# (torchrun's 1). The second's FLOPs are given, so its step is refused in the training loop, on both ranks, said once.
@pytest.mark.parametrize("hook, nproc, message", [
    ("def loss(outputs, targets):\n    return None", None, "recipe bad: loss(outputs, targets) returned None: it must"),
    ("def step(model, batch):\n    return model(batch[0])\n\ndef flops_per_sample(cfg):\n    return 1e6", 2,
     ("recipe bad: step(model, batch) returned a tensor of dtype float32 and shape (32, 10): it must return the "
      "batch's mean loss")),
    ("def flops_per_sample(cfg):\n    return 1e300", None,
     "recipe bad: flops_per_sample(cfg) returned 1e+300: more than 1e+18 FLOPs"),
], ids=["loss returns None", "step returns no scalar, 2 processes", "flops_per_sample returns 1e300"])
def test_a_hook_returning_what_cannot_be_trained_on_ends_in_one_line(tmp_path, hook, nproc, message):
    (tmp_path / "bad.py").write_text(f"from launcher.recipes.digits import *\n\n{hook}\n")
    result = launch(["recipe=bad.py", "wandb.mode=disabled"], tmp_path, nproc=nproc)
    assert_user_error(result, message, torchrun=bool(nproc))
