"""Smoke runs of the benchmarks in bench/: each script runs end to end, on a few steps and small models and data, and
emits its JSON.

The timings themselves are not asserted (a loaded CI machine makes them meaningless); what the launcher does per
step, which does not depend on the machine, is: no host reads or collectives beyond the plain loop's, except the
stop agreement every dist.stop_check_every steps.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

BENCH = REPO / "bench"


def run_bench(args: list[str], cwd: Path, timeout: float = 600, env: dict | None = None) -> str:
    result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **(env or {})})
    assert result.returncode == 0, f"exit {result.returncode}\nSTDOUT:\n{result.stdout}\nSTDERR:\n{result.stderr}"
    return result.stdout


def test_benchmarks_run_emit_their_json_and_report_it(tmp_path):
    # 100 steps a side, one epoch of 128: 50 to warm up, then 2 chunks of 25 (one loss logged, 5 stop agreements).
    overhead = run_bench([str(BENCH / "overhead.py"), "--archs", "mlp", "--procs", "2", "--reps", "1", "--chunks",
                          "2", "--chunk-steps", "25", "--warmup", "50", "--limit", "--lightning", "--workdir",
                          str(tmp_path)], tmp_path, env={"BENCH_TRAIN_SAMPLES": str(128 * 256)})
    run, summary = (json.loads(line) for line in overhead.splitlines())
    assert summary["summary"] and summary["procs"] == 2 and summary["runs"] == 1
    # The ratios are what the rates say (the rates themselves depend on the machine: not asserted).
    assert run["ratio"] == pytest.approx(run["launcher_steps_per_s"] / run["plain_steps_per_s"])
    assert run["control_ratio"] == pytest.approx(run["plain_again_steps_per_s"] / run["plain_steps_per_s"])
    assert summary["pooled_ratio"] == pytest.approx(run["ratio"])  # pooled over one run: that run's
    assert summary["pooled_control_ratio"] == pytest.approx(run["control_ratio"])
    assert run["ratio_to_limit"] == pytest.approx(run["launcher_steps_per_s"] / run["limit_steps_per_s"])
    assert run["ratio_to_lightning"] == pytest.approx(run["launcher_steps_per_s"] / run["lightning_steps_per_s"])
    # Both log the loss every 50 steps (one host read); the launcher adds the stop flag every 10 steps.
    assert run["plain_host_reads_per_step"] == pytest.approx(0.02)
    assert run["launcher_host_reads_per_step"] == pytest.approx(0.02 + 0.1)
    assert run["plain_collectives_per_step"] == 0 and run["launcher_collectives_per_step"] == pytest.approx(0.1)

    startup = run_bench([str(BENCH / "startup.py"), "--reps", "1", "--commands", "python -m launcher",
                         "torchrun x2 plain_ddp.py"], tmp_path)
    commands = [json.loads(line) for line in startup.splitlines()]
    assert [line["command"] for line in commands] == ["python -m launcher", "torchrun x2 plain_ddp.py"]
    assert all(0 < line["first_step_s"] < line["exit_s"] for line in commands)

    checkpoint = run_bench([str(BENCH / "checkpoint.py"), "--params", "1000000", "--fsdp-params", "1000000",
                            "--width", "256", "--reps", "1", "--dir", str(tmp_path), "--cases", "launcher",
                            "launcher async", "fsdp async"], tmp_path)  # torch.save and fsdp run as these do
    cases = json.loads(checkpoint)
    assert [case["case"] for case in cases] == ["launcher", "launcher async", "fsdp async"]
    assert all(0 < case["stall_s"] <= case["write_s"] for case in cases)

    wandb_log = run_bench([str(BENCH / "wandb_log.py"), "--records", "3", "--every", "0"], tmp_path)
    sides = [json.loads(line) for line in wandb_log.splitlines()]
    assert [side["case"] for side in sides] == ["wandb run.log in the training process",
                                                "launcher WandbRun.log (wandb in its own process)"]

    schedule = json.loads(run_bench([str(BENCH / "schedule.py"), "--steps", "200", "--rounds", "2"], tmp_path))
    assert set(schedule["schedule_us"]) == {"plain", "plain_again", "lr_scheduler", "lambda_lr"}

    paths = [json.loads(line) for line in run_bench([str(BENCH / "data.py"), "paths", "--seconds", "0.2",
                                                     "--corpus-gb", "0.002"], tmp_path).splitlines()]
    assert [(line["data"], line["path"].split(",")[0]) for line in paths] == [
        ("gpt windows", "dataloader"), ("gpt windows", "take"), ("mlp TensorDataset", "dataloader"),
        ("mlp TensorDataset", "indexed"), ("token shards (memory maps)", "take")]
    memory = [json.loads(line) for line in run_bench([str(BENCH / "data.py"), "memory", "--sizes", "0.002", "0.004",
                                                      "--batches", "5", "--context", "64"], tmp_path).splitlines()]
    assert [line["corpus_gb"] for line in memory] == [0.002, 0.004] and all(line["batches"] == 5 for line in memory)

    outputs = {"overhead.jsonl": overhead, "startup.jsonl": startup, "checkpoint.json": checkpoint,
               "wandb_log.jsonl": wandb_log}
    for name, output in outputs.items():
        (tmp_path / name).write_text(output)
    report = run_bench([str(BENCH / "report.py"), *outputs], tmp_path)
    assert "| mlp | 2 |" in report and f"({run['ratio_to_lightning']:.2f}x) |" in report
    assert "| mlp | 2 |" in report and "| `python -m launcher` |" in report and "| launcher | 986,880 |" in report
    assert "| launcher async | 986,880 |" in report and "| fsdp async | 986,880 |" in report  # 15 layers of 256
    assert "| launcher WandbRun.log (wandb in its own process) |" in report


def test_the_gpu_benchmark_path_resnet18_bf16_channels_last_data_wait_runs_on_the_cpu(tmp_path):
    # The GPU table's command (BENCHMARKS.md, bench/gpu.sh), on a CPU and a few tiny steps: both loops in bf16 and
    # channels_last, the launcher also on a batch kept on the device and with its observability stubbed out, on the
    # plain loop's data path (a DataLoader: the launcher's reads the data set through its seeded keys, the plain
    # loop's the data set itself). Only a GPU gives the numbers.
    settings = ["train.amp=bf16", "train.channels_last=true", "train.batch_size=16", "data.resident=never",
                "wandb.mode=disabled"]
    output = run_bench([str(BENCH / "overhead.py"), "--archs", "resnet18", "--procs", "1", "--reps", "1", "--chunks",
                        "2", "--chunk-steps", "2", "--warmup", "1", "--data-wait", "--unobserved", "--workdir",
                        str(tmp_path), "--launcher-args", *settings], tmp_path, env={"BENCH_TRAIN_SAMPLES": "256"})
    run, summary = (json.loads(line) for line in output.splitlines())
    assert run["device"] == "cpu" and run["launcher_args"] == settings
    resident_time = run["launcher_steps_per_s"] / run["launcher_resident_steps_per_s"]  # as a share of the loader's
    assert run["data_wait_fraction"] == pytest.approx(1 - resident_time)
    unobserved_time = run["launcher_steps_per_s"] / run["launcher_unobserved_steps_per_s"]
    assert summary["observability_cost"] == pytest.approx(1 / unobserved_time - 1)
    assert run["launcher_host_reads_per_step"] == 0 and run["plain_host_reads_per_step"] == 0  # no log in 5 steps
    # The report's GPU table, for the same summary as a GPU would label it.
    spec = importlib.util.spec_from_file_location("report", BENCH / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    table = report.gpu_table([{**summary, "device": "NVIDIA H100 80GB HBM3"}])
    assert f"| resnet18 | 1 | NVIDIA H100 80GB HBM3 | {' '.join(settings)} |" in table
    assert table.splitlines()[-1].endswith(f"| {summary['data_wait_fraction']:.1%} |  |  |")  # no limit, Lightning


def test_fsdp_holds_half_of_ddps_training_state_per_rank_on_two_processes(tmp_path):
    torchrun = str(Path(sys.executable).parent / "torchrun")
    output = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", str(BENCH / "memory.py"),
                             "model.layers=2", "model.width=32", "data.train_bytes=40000", "train.batch_size=16"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ,
                                                                                            "OMP_NUM_THREADS": "1"})
    assert output.returncode == 0, f"exit {output.returncode}\nSTDERR:\n{output.stderr}"
    ddp, fsdp = (json.loads(line) for line in output.stdout.splitlines())
    assert (ddp["strategy"], fsdp["strategy"]) == ("ddp", "fsdp")
    for whole, rank in zip(ddp["ranks"], fsdp["ranks"]):
        assert rank["model_parameters"] == whole["model_parameters"] == 35_712  # the whole model on each
        # Every tensor of this model has an even first dimension, so each rank's shard is exactly half.
        for kind in ("parameters", "gradients", "optimizer_state"):
            assert rank[kind] * 2 == whole[kind] > 0, kind
        assert whole["optimizer_state"] == 2 * whole["parameters"]  # AdamW: two moments per parameter


def test_activation_checkpointing_bench_keeps_less_for_each_stronger_mode():
    """What a forward leaves for the backward is an allocation count, not a time: the same on any machine."""
    output = subprocess.run([sys.executable, str(BENCH / "activations.py"), "--rounds", "1", "--steps", "1",
                             "model.layers=4", "model.width=32", "model.context=32", "train.batch_size=8",
                             "data.train_bytes=20000"], capture_output=True, text=True, timeout=300)
    assert output.returncode == 0, f"exit {output.returncode}\nSTDERR:\n{output.stderr}"
    modes = json.loads(output.stdout.splitlines()[-1])["modes"]
    kept = {mode: result["activation_bytes"] for mode, result in modes.items()}
    assert kept["off"] == kept["off (A/A)"] > kept["op"] > kept["2"] > kept["full"] > 0, kept
    assert all(result["step_s"] > 0 for result in modes.values())
