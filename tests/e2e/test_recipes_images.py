"""The image recipes on data in the real on-disk formats (CIFAR-10 pickle batches, an ImageFolder tree of PNGs),
the multi-output recipe, and the precision and compile options, each for a few steps on 2 processes."""

import pickle

import numpy as np
import pytest
import torch
from helpers import check_ok, epoch_records, launch, load_weights, read_metrics
from PIL import Image

FEW_STEPS = ["train.max_steps=2", "train.epochs=1", "data.num_workers=0", "wandb.mode=disabled", "ckpt.keep=1"]


@pytest.fixture
def cifar_root(tmp_path):
    """A tiny CIFAR-10 as its python pickle batches: 5 training batches of 8 images, a test batch of 8."""
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (8, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, 8).tolist()}
        with open(folder / name, "wb") as file:
            pickle.dump(batch, file)
    return folder.parent


@pytest.fixture
def image_tree(tmp_path):
    """An ImageFolder tree of PNGs: train/ and val/, two classes (dark and bright squares)."""
    root = tmp_path / "images"
    for split, count in (("train", 8), ("val", 4)):
        for label, level in (("dark", 30), ("bright", 220)):
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                pixels = np.full((40, 48, 3), level + i, dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / label / f"{i}.png")
    return root


def test_resnet18_trains_on_cifar10_batches(tmp_path, cifar_root):
    args = ["recipe=resnet18", f"data.root={cifar_root}", "train.batch_size=8", "eval.batch_size=8", "run.dir=run"]
    result = check_ok(launch([*args, *FEW_STEPS, "train.channels_last=true"], tmp_path, nproc=2))
    assert "11,173,962 parameters" in result.stdout  # torchvision's ResNet-18 with a 10-class head
    (record,) = epoch_records(tmp_path / "run")
    assert record["step"] == 2 and record["eval/accuracy"] * 8 in range(9)  # a count of the 8 test images
    evaluated = check_ok(launch([*args, *FEW_STEPS, "eval.only=true"], tmp_path))  # its checkpoint, evaluated afresh
    assert f"eval/accuracy {record['eval/accuracy']:.4f}" in evaluated.stdout


def test_resnet18_trains_on_an_image_folder_and_groups_its_parameters(tmp_path, image_tree):
    args = ["recipe=resnet18", "data.format=imagefolder", f"data.root={image_tree}", "data.image_size=32",
            "model.num_classes=2", "model.classifier_lr_mult=0.1", "train.batch_size=4", "run.dir=run"]
    check_ok(launch([*args, *FEW_STEPS, "train.log_every=1"], tmp_path, nproc=2))
    steps = [r for r in read_metrics(tmp_path / "run") if "lr/group0" in r]
    # backbone with and without decay at optim.lr, the classifier's two groups at a tenth of it
    assert [round(steps[0][f"lr/group{i}"] / steps[0]["lr/group0"], 6) for i in range(4)] == [1, 1, 0.1, 0.1]
    wrong = launch([*args, *FEW_STEPS, "model.num_classes=10", "run.dir=wrong"], tmp_path)
    assert wrong.returncode == 2 and "has 2 classes but model.num_classes=10" in wrong.stderr
    assert not (tmp_path / "wrong").exists()


def test_a_multi_output_model_with_a_custom_loss_trains_and_is_summarised(tmp_path):
    check_ok(launch(["recipe=features", "run.dir=run", "train.epochs=2", "wandb.mode=disabled"], tmp_path, nproc=2))
    summary = (tmp_path / "run" / "summary.txt").read_text()
    assert "Linear-12" in summary and "Total params: 28,186" in summary
    records = epoch_records(tmp_path / "run")
    assert records[-1]["train/loss"] < records[0]["train/loss"] and "eval/accuracy" in records[-1]


def test_bf16_on_the_cpu_trains(tmp_path):
    check_ok(launch(["recipe=digits", "run.dir=run", "train.epochs=3", "train.amp=bf16", "wandb.mode=disabled"],
                    tmp_path))
    losses = [r["train/loss"] for r in epoch_records(tmp_path / "run")]
    assert losses[2] < losses[1] < losses[0]


def test_fp16_checkpoints_its_grad_scaler_and_resumes_with_it(tmp_path):
    args = ["recipe=digits", "run.dir=run", "train.amp=fp16", "wandb.mode=disabled", "ckpt.every_steps=5"]
    check_ok(launch([*args, "train.epochs=1"], tmp_path))
    saved = torch.load(tmp_path / "run" / "checkpoints" / "step_000000022.pt", weights_only=True)
    assert saved["scaler"]["scale"] > 0 and saved["scaler"]["_growth_tracker"] == 22
    result = check_ok(launch([*args, "train.epochs=2"], tmp_path))
    assert "resumed from run/checkpoints/step_000000022.pt" in result.stdout
    resumed = torch.load(tmp_path / "run" / "checkpoints" / "step_000000044.pt", weights_only=True)
    assert resumed["scaler"]["_growth_tracker"] == 44  # counted on from the saved scaler, not from zero


def test_compiled_ddp_model_trains_like_the_eager_one(tmp_path):
    args = ["recipe=digits", "train.max_steps=3", "train.epochs=1", "wandb.mode=disabled"]
    check_ok(launch([*args, "run.dir=eager"], tmp_path, nproc=2))
    check_ok(launch([*args, "run.dir=compiled", "train.compile=true"], tmp_path, nproc=2, timeout=600))
    eager, compiled = load_weights(tmp_path / "eager"), load_weights(tmp_path / "compiled")
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-4, atol=1e-5)

