"""Data on the device (data.resident=always, on the CPU device here), in real processes: the same weights on 1 and
2 processes, and after a SIGKILL mid-epoch and torchrun's restart."""

import torch
from helpers import ARGS, RECIPE, assert_identical, check_ok, launch, load_weights, reference_weights


def test_resident_data_on_one_and_two_processes_ends_with_the_same_weights(tmp_path):
    args = ["recipe=digits", "train.epochs=2", "data.resident=always", "wandb.mode=disabled"]
    one = check_ok(launch([*args, "run.dir=one"], tmp_path))
    check_ok(launch([*args, "run.dir=two"], tmp_path, nproc=2))
    assert "| data on the device (" in one.stdout
    one, two = load_weights(tmp_path / "one"), load_weights(tmp_path / "two")
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=1e-5, atol=1e-6)


def test_resident_data_sigkill_mid_epoch_then_restart_ends_bitwise_identical(tmp_path):
    (tmp_path / "interruptible.py").write_text(RECIPE)
    reference = reference_weights(tmp_path)  # through the DataLoader
    result = check_ok(launch([*ARGS, "run.dir=run", "data.resident=always"], tmp_path, nproc=2,
                             env={"INTERRUPT": "1:30:SIGKILL"}, torchrun_args=["--max-restarts=1"]))
    assert "resumed from run/checkpoints/step_000000025.pt" in result.stdout
    assert_identical(load_weights(tmp_path / "run"), reference)
