"""What a user types: recipe forms, --cfg, and every error a user can cause, each a clear message and exit 2."""

import re
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from helpers import (
    TORCHRUN_BANNER,
    assert_identical,
    assert_no_run_left,
    assert_user_error,
    check_ok,
    error_lines,
    launch,
    load_weights,
    without_credentials,
)

from launcher.config.keys import KEYS


def test_cfg_prints_the_resolved_config_and_exits(tmp_path):
    (tmp_path / "run.yaml").write_text("train:\n  epochs: 7\noptim:\n  lr: 0.5\n")
    result = check_ok(launch(["recipe=lenet", "--config", "run.yaml", "optim.lr=0.25", "--cfg"], tmp_path))
    printed = yaml.safe_load(result.stdout)
    assert printed["recipe"] == "lenet"
    assert printed["train"]["epochs"] == 7  # YAML over the recipe's 10
    assert printed["train"]["batch_size"] == 256 and printed["train"]["seed"] == 0  # recipe, engine
    assert printed["optim"]["lr"] == 0.25  # command line over YAML
    assert printed["model"] == {"classifier_lr_mult": 1.0}  # the recipe's own key
    assert not (tmp_path / "runs").exists()


def test_recipe_by_dotted_path_and_by_file(tmp_path):
    package = tmp_path / "myproject"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "tiny.py").write_text("from launcher.recipes.digits import *\nDEFAULTS = {'model': {'width': 3}}\n")
    dotted = check_ok(launch(["recipe=myproject.tiny", "--cfg"], tmp_path, env={"PYTHONPATH": str(tmp_path)}))
    assert yaml.safe_load(dotted.stdout)["model"] == {"width": 3}
    by_file = check_ok(launch([f"recipe={package / 'tiny.py'}", "--cfg"], tmp_path))
    assert yaml.safe_load(by_file.stdout)["model"] == {"width": 3}


def test_unknown_recipe_lists_the_available_ones(tmp_path):
    result = launch(["recipe=lenett"], tmp_path)
    assert_user_error(result, "unknown recipe 'lenett': use a short name (digits, features, gpt, lenet, linreg,")


def test_recipe_with_a_syntax_error(tmp_path):
    (tmp_path / "broken.py").write_text("def build_model(cfg)\n    return None\n")
    result = launch(["recipe=broken.py"], tmp_path)
    assert_user_error(result, "syntax error in")
    assert "broken.py, line 1" in error_lines(result)[0]


def test_recipe_without_build_model(tmp_path):
    (tmp_path / "incomplete.py").write_text("def build_datasets(cfg):\n    return None, None\n")
    assert_user_error(launch(["recipe=incomplete.py"], tmp_path), "does not define build_model(cfg)")


@pytest.mark.parametrize(
    "args, message",
    [
        (["recipe=digits", "train.epoch=3"], "unknown key 'train.epoch': did you mean train.epochs"),
        (["recipe=digits", "train.epochs=three"], "train.epochs='three' is not an integer"),
        (["recipe=digits", "optim.name=lamb"], "optim.name='lamb' is not one of: sgd, adam, adamw"),
        (["recipe=digits", "--configs", "x.yaml"], "unknown option '--configs'"),
        (["train.epochs=3"], "no recipe given"),
    ],
)
def test_config_errors(tmp_path, args, message):
    assert_user_error(launch(args, tmp_path), message)


@pytest.mark.parametrize(
    "args, message",
    [
        (["train.batch_size=63"], "train.batch_size=63 is the global batch and must split evenly over 2 processes"),
        (["dist.backend=nccl"], "dist.backend=nccl needs CUDA GPUs, and this machine has none"),
    ],
)
def test_config_errors_stop_before_workers_start(tmp_path, args, message):
    result = launch(["recipe=digits", "dist.nproc_per_node=2", *args], tmp_path)
    assert_user_error(result, message)
    assert TORCHRUN_BANNER not in result.stderr


def test_config_error_under_torchrun_is_printed_once(tmp_path):
    assert_user_error(launch(["recipe=digits", "train.batch_size=63"], tmp_path, nproc=2), "split evenly over 2", True)


def test_missing_data_is_reported_once_before_training_and_leaves_no_run(tmp_path):
    result = launch(["recipe=lenet", f"data.root={tmp_path / 'nothing'}"], tmp_path, nproc=2,
                    env=without_credentials(tmp_path))
    assert_user_error(result, "Fashion-MNIST is not in data.root=", torchrun=True)
    assert "FashionMNIST/raw" in error_lines(result)[0] and "data.download=true" in error_lines(result)[0]
    assert "epoch 1" not in result.stdout
    assert_no_run_left(tmp_path, result)


def test_data_error_on_one_rank_only_fails_the_job_once(tmp_path):
    (tmp_path / "half.py").write_text(textwrap.dedent("""
        import os
        from launcher.recipes.digits import build_model, DEFAULTS, build_datasets as digits_datasets
        from launcher.errors import UserError

        def build_datasets(cfg):
            if os.environ["RANK"] == "1":  # a test stand-in for a node whose disk lacks the data
                raise UserError("no data on this node")
            return digits_datasets(cfg)
    """))
    result = launch(["recipe=half.py"], tmp_path, nproc=2)
    assert_user_error(result, "rank 1: no data on this node", torchrun=True)


def test_failed_download_says_where_to_put_the_files(tmp_path):
    # A proxy on a closed local port makes every download fail at once, with or without a network.
    closed = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}
    result = launch(["recipe=mlp", f"data.root={tmp_path}", "data.download=true"], tmp_path, env=closed)
    assert_user_error(result, "downloading Fashion-MNIST into")
    assert "copy the four files train-images-idx3-ubyte" in error_lines(result)[0]
    assert str(tmp_path / "FashionMNIST" / "raw") in error_lines(result)[0]


def test_help_lists_usage_and_every_key_with_its_meaning(tmp_path):
    result = check_ok(launch(["--help"], tmp_path))
    assert "usage: python -m launcher recipe=NAME" in result.stdout and "--cfg" in result.stdout
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line.startswith("  ") and "." in line}
    for name, key in KEYS.items():
        if name != "recipe":
            assert name in lines and key.meaning in lines[name], name
    assert re.search(r"\n  train\.amp +str +none +mixed precision", result.stdout)  # columns as wide as the keys
    assert "one of: none, bf16, fp16" in lines["train.amp"] and "in [0, 2**31)" in lines["train.seed"]


THREADS = textwrap.dedent("""
    import os
    from pathlib import Path
    import torch
    from launcher.recipes.digits import DEFAULTS, build_datasets, build_model as digits_model

    def build_model(cfg):
        Path(f"threads.{os.environ.get('RANK', 0)}").write_text(str(torch.get_num_threads()))
        return digits_model(cfg)
""")


def test_quiet_says_where_the_model_went_in_the_directory_cfg_names_and_convert_takes_a_step_by_number(tmp_path):
    (tmp_path / "threads.py").write_text(THREADS)
    args = ["recipe=threads.py", "train.epochs=1", "dist.threads=2", "wandb.mode=disabled"]
    shown = check_ok(launch([*args, "--cfg"], tmp_path)).stdout.splitlines()[0]
    run_dir = re.fullmatch(r"# the run's directory: (runs/threads/\w+) \(run\.dir '': .*\)", shown).group(1)
    quiet = check_ok(launch([*args, "profile.steps=2", "--quiet"], tmp_path))
    # One line, the result: nothing of the profiler's own (kineto's USDT lines) either.
    assert quiet.stdout + quiet.stderr == f"launcher: done; model: {run_dir}/model.pt\n"
    assert (tmp_path / "threads.0").read_text() == "2"  # dist.threads, over OMP_NUM_THREADS=1, before the model
    (checkpoint,) = (tmp_path / run_dir / "checkpoints").glob("step_*.pt")  # a DDP run's: one file
    step = int(checkpoint.stem.removeprefix("step_"))
    convert = [sys.executable, "-m", "launcher.convert", f"{run_dir}/checkpoints/step_{step}"]
    converted = check_ok(subprocess.run(convert, cwd=tmp_path, capture_output=True, text=True, check=False))
    assert f"wrote {run_dir}/model_{checkpoint.stem}.pt" in converted.stdout
    assert_identical(load_weights(tmp_path / run_dir), torch.load(tmp_path / run_dir / f"model_{checkpoint.stem}.pt",
                                                                  weights_only=True))
