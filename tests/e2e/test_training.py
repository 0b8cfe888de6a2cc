"""Real training runs: torchrun processes on gloo, real files, checked by their results."""

import textwrap

import torch
from helpers import (
    check_ok,
    epoch_records,
    history,
    launch,
    load_weights,
    offline_runs,
    read_metrics,
    run_id,
    wandb_records,
    without_credentials,
)

from launcher.config.build import build_config, parse_overrides
from launcher.recipe import load_recipe


def fresh_model(recipe_name: str, overrides=()):
    recipe = load_recipe(recipe_name)
    return recipe.build_model(build_config(recipe.defaults, {}, parse_overrides(overrides), recipe_name))


def test_digits_on_two_processes_reaches_95_percent_and_makes_one_offline_wandb_run(tmp_path):
    result = check_ok(launch(["recipe=digits", "run.dir=out"], tmp_path, nproc=2, env=without_credentials(tmp_path)))
    run_dir = tmp_path / "out"
    epochs = epoch_records(run_dir)
    assert len(epochs) == 20 and epochs[-1]["eval/accuracy"] >= 0.95
    assert {"epoch", "eval/loss", "eval/accuracy", "train/loss", "time/epoch_s", "throughput/samples_per_s"} <= set(
        epochs[-1]
    )
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "checkpoints", "config.yaml", "history.jsonl", "metrics.jsonl", "model.pt", "run.json", "summary.txt", "wandb",
        "wandb_id"
    ]
    assert "Total params: 14,698" in (run_dir / "summary.txt").read_text()
    assert "2 process(es), backend gloo" in result.stdout
    assert result.stdout.count("epoch 20/20") == 1  # rank 1 prints nothing
    assert "[rank 1]" not in result.stderr

    (offline,) = offline_runs(run_dir)  # one run, from rank 0 only
    assert f"upload it with `wandb sync {offline.relative_to(tmp_path)}`" in result.stdout
    records = wandb_records(offline)
    config = next(record["run"]["config"]["update"] for record in records if record["type"] == "run")
    assert config["recipe"] == "digits" and config["train"]["epochs"] == 20
    rows = history(records)
    evaluated = [row for row in rows if "eval/accuracy" in row]
    assert [row["_step"] for row in evaluated] == list(range(22, 441, 22))
    assert evaluated[-1]["eval/accuracy"] == epochs[-1]["eval/accuracy"]
    assert any("lr/group0" in row and "throughput/samples_per_s" in row for row in rows)
    summary = [record["summary"]["update"] for record in records if record["type"] == "summary"]
    assert any(update.get("parameters") == 14_698 and "Total params" in update.get("model_summary", "")
               for update in summary)
    assert any(update.get("model") == str((run_dir / "model.pt").resolve()) for update in summary)
    assert (run_dir / "wandb_id").read_text() == run_id(records)


def test_lenet_on_one_and_two_processes_ends_with_the_same_weights(tmp_path, fashion_root):
    args = ["recipe=lenet", f"data.root={fashion_root}", "train.epochs=2", "train.batch_size=64"]
    check_ok(launch([*args, "run.dir=one"], tmp_path))
    check_ok(launch([*args, "run.dir=two"], tmp_path, nproc=2))
    one, two = load_weights(tmp_path / "one"), load_weights(tmp_path / "two")
    assert one.keys() == two.keys() and not any(key.startswith("module.") for key in one)
    initial = fresh_model("lenet").state_dict()
    assert not torch.allclose(one["classifier.5.weight"], initial["classifier.5.weight"])  # it trained
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=1e-5, atol=1e-6)
    # model.pt is a plain state_dict: it loads strictly into a freshly built recipe model.
    model = fresh_model("lenet")
    model.load_state_dict(two)


def test_python_starts_its_workers_through_torchrun_and_linreg_recovers_w_and_b(tmp_path):
    result = check_ok(launch(["recipe=linreg", "dist.nproc_per_node=2"], tmp_path))
    assert "2 process(es), backend gloo" in result.stdout
    (run_dir,) = (tmp_path / "runs" / "linreg").iterdir()  # runs/<recipe>/<run id>, one for the whole job
    weights = load_weights(run_dir)
    torch.testing.assert_close(weights["weight"], torch.tensor([[2.0, -3.4]]), atol=5e-3, rtol=0)
    torch.testing.assert_close(weights["bias"], torch.tensor([4.2]), atol=5e-3, rtol=0)
    assert epoch_records(run_dir)[-1]["eval/loss"] < 1e-3
    assert "eval/accuracy" not in epoch_records(run_dir)[-1]  # regression: no accuracy
    assert any("lr/group0" in record for record in read_metrics(run_dir))  # per-step lines every train.log_every


def test_sharded_evaluation_equals_rank_zero_evaluation_exactly(tmp_path):
    args = ["recipe=digits", "train.epochs=2", "eval.batch_size=50"]  # 359 samples: 8 uneven batches
    check_ok(launch([*args, "run.dir=rank0"], tmp_path, nproc=2))
    check_ok(launch([*args, "run.dir=sharded", "eval.sharded=true"], tmp_path, nproc=2))
    rank0, sharded = load_weights(tmp_path / "rank0"), load_weights(tmp_path / "sharded")
    assert all(torch.equal(rank0[key], sharded[key]) for key in rank0)  # the same model was evaluated
    for plain, split in zip(epoch_records(tmp_path / "rank0"), epoch_records(tmp_path / "sharded")):
        assert plain["eval/loss"] == split["eval/loss"]
        assert plain["eval/accuracy"] == split["eval/accuracy"]


STUCK_RECIPE = textwrap.dedent("""
    import os, time
    from launcher.recipes.digits import build_model, DEFAULTS, build_datasets as digits_datasets

    # A test stand-in for a rank stuck on a dead file system (a rank's error: test_ending.py).
    def build_datasets(cfg):
        if os.environ.get("STUCK_RANK") == os.environ["RANK"]:
            time.sleep(120)
        return digits_datasets(cfg)
""")


def test_a_stuck_rank_ends_the_job_after_the_timeout(tmp_path):
    (tmp_path / "stuck.py").write_text(STUCK_RECIPE)
    result = launch(["recipe=stuck.py", "dist.timeout_s=3"], tmp_path, nproc=2, env={"STUCK_RANK": "1"}, timeout=90)
    assert result.returncode != 0
    assert ("rank 1 did not reach the collective in the setup's model and data within dist.timeout_s=3 s; it was in "
            "build_datasets (stuck.py:8)") in result.stderr


def test_a_model_torchsummary_cannot_handle_gets_a_parameter_table_as_its_summary(tmp_path):
    (tmp_path / "tokens.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn
        from torch.utils.data import TensorDataset

        DEFAULTS = {"train": {"epochs": 1, "batch_size": 8}}

        def build_model(cfg):  # integer token inputs: torchsummary feeds floats and fails
            return nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2))

        def build_datasets(cfg):
            tokens = torch.randint(0, 10, (32, 3))
            return TensorDataset(tokens, tokens[:, 0] % 2), None
    """))
    result = check_ok(launch(["recipe=tokens.py", "run.dir=out"], tmp_path))
    assert "torchsummary cannot run this model (" in result.stdout
    summary = (tmp_path / "out" / "summary.txt").read_text()  # a parameter table instead
    assert "0.weight" in summary and "[10, 4]" in summary and "Total params: 66" in summary
