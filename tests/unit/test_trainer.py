"""The Trainer in this process (one rank, no process group): the loop, its records, checkpoints, a stop and the
resume after it, config changes on resume, gradient accumulation. The multi-process versions are in tests/e2e."""

import json
import math

import pytest
import torch
from helpers import RECIPE, load_weights
from helpers import build_trainer as build

from launcher.distributed.stop import StopRequested
from launcher.errors import LauncherError
from launcher.tracking.metrics import read_records

pytestmark = pytest.mark.usefixtures("trainer_dir")


def history(run_dir) -> list[dict]:
    return [json.loads(line) for line in open(f"{run_dir}/history.jsonl")]


def test_the_loop_trains_evaluates_checkpoints_and_records_every_step_it_reports(tmp_path):
    trainer = build("recipe=digits", "run.dir=run", "train.epochs=2", "train.log_every=5", "ckpt.every_steps=10",
                    recipe="digits")
    trainer.run()
    records = read_records(tmp_path / "run" / "metrics.jsonl")
    epochs = [record for record in records if "eval/accuracy" in record]
    assert [record["step"] for record in epochs] == [22, 44]  # 1,438 training samples // 64 = 22 steps an epoch
    assert epochs[1]["train/loss"] < epochs[0]["train/loss"] and epochs[1]["eval/accuracy"] > 0.85
    assert [record["step"] for record in records if "lr/group0" in record] == list(range(5, 45, 5))
    checkpoints = sorted(path.name for path in (tmp_path / "run" / "checkpoints").iterdir())
    # Every 10 steps and at each epoch's end (22), the newest ckpt.keep=3 kept.
    assert checkpoints == ["step_000000030.pt", "step_000000040.pt", "step_000000044.pt"]
    final = load_weights("run")
    assert all(torch.equal(final[key], value) for key, value in trainer.model.state_dict().items())
    assert [event.get("outcome") for event in history("run")] == [None, "finished"]


def test_a_stop_mid_epoch_then_a_new_trainer_continue_to_the_uninterrupted_weights_bitwise(monkeypatch):
    build("run.dir=reference").run()
    monkeypatch.setenv("INTERRUPT", "0:30:SIGTERM")  # the recipe signals this process in its 30th loss call
    with pytest.raises(StopRequested, match=r"stopped after step (\d+) \(SIGTERM\): checkpoint written to") as stop:
        build("run.dir=run").run()
    stopped_at = int(str(stop.value).split()[3])
    resumed = build("run.dir=run")
    where = resumed.position
    assert 22 < stopped_at < 44 and (where.epoch, where.global_step) == (2, stopped_at)  # 22 steps an epoch
    assert where.step_in_epoch == stopped_at - 22
    resumed.run()
    reference, final = load_weights("reference"), load_weights("run")
    assert all(torch.equal(reference[key], final[key]) for key in reference)
    assert [event.get("outcome") for event in history("run")] == [None, "stopped", None, "finished"]


def test_on_resume_a_changed_lr_is_applied_and_a_changed_model_refused():
    common = ["recipe=digits", "run.dir=run", "sched.name=constant"]
    build(*common, "train.epochs=1", "optim.lr=0.05", recipe="digits").run()
    refusal = "cannot continue with these keys changed since its checkpoint: model.channels 32 -> 3"
    with pytest.raises(LauncherError, match=refusal) as refused:
        build(*common, "train.epochs=2", "model.channels=3", recipe="digits")
    assert refused.value.exit_code == 2  # the user's mistake
    resumed = build(*common, "train.epochs=2", "optim.lr=0.01", recipe="digits")
    assert resumed.position.global_step == 22
    assert [group["lr"] for group in resumed.optimizer.param_groups] == [0.01]
    resumed.close("failed")  # gives the directory back


def test_a_complete_run_says_so_and_builds_nothing(caplog):
    build("run.dir=run", "train.epochs=1").run()
    with caplog.at_level("INFO", logger="launcher"):
        assert build("run.dir=run", "train.epochs=1", "log.level=info") is None
    assert "run.dir run is complete: 22 steps, 1 epochs" in caplog.text


def test_accumulated_micro_batches_give_the_weights_of_the_whole_batch():
    # Five steps: the sums' other order grows with every step, past 1e-5 within an epoch on some CPUs (an AMD EPYC).
    common = ["recipe=digits", "train.max_steps=5", "train.batch_size=32", "train.clip_grad_norm=1.0"]
    build(*common, "run.dir=accumulated", "train.grad_accum=4", recipe="digits").run()
    build(*common, "run.dir=whole", recipe="digits").run()
    accumulated, whole = load_weights("accumulated"), load_weights("whole")
    for key in whole:
        torch.testing.assert_close(accumulated[key], whole[key], rtol=1e-5, atol=1e-6)


TINY_GPT = ["recipe=gpt", "model.layers=1", "model.width=16", "model.heads=2", "model.context=16",
            "data.train_bytes=8000", "data.eval_bytes=2000", "train.epochs=1", "train.log_every=5"]


def test_the_gpt_recipe_trains_with_dict_batches_and_every_hook(tmp_path):
    build(*TINY_GPT, "run.dir=run", recipe="gpt").run()
    (record,) = [record for record in read_records(tmp_path / "run" / "metrics.jsonl") if "eval/loss" in record]
    assert record["step"] == 15  # 8,000 bytes: 499 windows of 16 inputs and the next byte, 15 batches of 32
    assert record["eval/perplexity"] == pytest.approx(math.exp(record["eval/loss"]), rel=1e-6)  # float32 sums
    assert 0 < record["eval/next_byte_accuracy"] < 1 and record["eval/loss"] < math.log(256)
    assert record["throughput/tokens_per_s"] == pytest.approx(record["throughput/samples_per_s"] * 16)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_a_step_hook_trains_under_mixed_precision_accumulation_and_clipping(tmp_path, amp):
    build(*TINY_GPT, "run.dir=run", f"train.amp={amp}", "train.grad_accum=2", "train.clip_grad_norm=0.5",
          recipe="gpt").run()
    records = read_records(tmp_path / "run" / "metrics.jsonl")
    assert all(math.isfinite(record["train/loss"]) and record["grad_norm"] > 0 for record in records[:-1])
    assert records[-1]["eval/loss"] < math.log(256)


# The interruptible digits recipe with a batched augmentation on the device: each image shifted by up to a pixel,
# and noise.
AUGMENTED = RECIPE + """
def augment(batch, generator, cfg):
    images, labels = batch
    shifts = torch.randint(-1, 2, (2,), generator=generator, device=images.device).tolist()
    noise = torch.randn(images.shape, generator=generator, device=images.device) * 0.05
    return torch.roll(images, shifts, dims=(2, 3)) + noise, labels
"""


def test_device_resident_data_trains_exactly_as_the_dataloader_path(tmp_path):
    build("recipe=digits", "run.dir=loader", "train.epochs=2", "data.resident=never", recipe="digits").run()
    build("recipe=digits", "run.dir=resident", "train.epochs=2", "data.resident=always", recipe="digits").run()
    loader, resident = load_weights("loader"), load_weights("resident")
    assert all(torch.equal(loader[key], resident[key]) for key in loader)


def test_an_on_device_augmentation_is_resumed_exactly_on_either_data_path(tmp_path, monkeypatch):
    (tmp_path / "augmented.py").write_text("import torch\n" + AUGMENTED)
    build("recipe=augmented.py", "run.dir=reference", "train.epochs=2", recipe="augmented.py").run()
    monkeypatch.setenv("INTERRUPT", "0:30:SIGTERM")
    with pytest.raises(StopRequested):
        build("recipe=augmented.py", "run.dir=run", "train.epochs=2", "data.resident=always",
              recipe="augmented.py").run()
    build("recipe=augmented.py", "run.dir=run", "train.epochs=2", "data.resident=always", recipe="augmented.py").run()
    reference, resumed = load_weights("reference"), load_weights("run")
    assert all(torch.equal(reference[key], resumed[key]) for key in reference)
    build("recipe=interruptible.py", "run.dir=plain", "train.epochs=2").run()
    assert not torch.equal(load_weights("plain")["1.weight"], reference["1.weight"])  # the augmentation did something
