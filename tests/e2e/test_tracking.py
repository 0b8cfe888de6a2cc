"""Experiment tracking with the real wandb library (offline, read back with wandb's own reader), the terminal,
and the plot command."""

import os
import signal
import struct
import subprocess
import sys

import numpy as np
import torch
from helpers import (
    check_ok,
    history,
    launch,
    offline_runs,
    read_metrics,
    wandb_records,
    without_credentials,
)

from launcher.tracking.wandb import WandbRun


def test_wandb_finishes_while_data_loader_workers_hold_copies_of_its_pipe(tmp_path):
    # Forked loader workers inherit the pipe to the wandb process: its end of input is the finish message.
    check_ok(launch(["recipe=digits", "run.dir=run", "train.epochs=1", "data.num_workers=2"], tmp_path,
                    env=without_credentials(tmp_path), timeout=120))
    (offline,) = offline_runs(tmp_path / "run")
    assert "eval/accuracy" in history(wandb_records(offline))[-1]


def test_the_wandb_process_dying_costs_one_warning_and_logging_goes_on_without_it(tmp_path, caplog):
    options = {"project": "launcher", "dir": str(tmp_path), "id": "dying001", "resume": "allow"}
    run = WandbRun()
    run.begin("dying001", 0, {"mode": "offline", "options": options, "log_level": "warning"})
    run.log({"step": 1, "train/loss": torch.tensor(1.0), "eval/accuracy": np.float32(0.5)})  # a recipe's metrics
    os.kill(run._process.pid, signal.SIGKILL)
    run._process.wait()
    for step in (2, 3):
        run.log({"step": step, "train/loss": 1.0})
    run.finish()
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].startswith("the wandb process ended (BrokenPipeError"), warnings


def test_wandb_online_with_credentials_and_no_network_logs_offline_at_once_and_keeps_every_record(tmp_path):
    # A key, and a server nothing answers at: the start goes offline without waiting out wandb's init timeout.
    env = {**without_credentials(tmp_path), "WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9"}
    result = check_ok(launch(["recipe=digits", "run.dir=run", "train.epochs=2", "train.log_every=5",
                              "wandb.mode=online"], tmp_path, env=env))
    assert "wandb: http://127.0.0.1:9 cannot be reached; logging offline instead" in result.stdout
    assert "could not start" not in result.stdout and "still finishing" not in result.stdout
    (offline,) = offline_runs(tmp_path / "run")
    assert [row["_step"] for row in history(wandb_records(offline))] == [
        record["step"] for record in read_metrics(tmp_path / "run")]


def test_a_terminal_gets_a_progress_bar_and_a_log_gets_plain_lines(tmp_path):
    args = ["recipe=digits", "train.epochs=2", "train.log_every=10", "wandb.mode=disabled"]
    piped = check_ok(launch([*args, "run.dir=piped"], tmp_path))
    assert "epoch 1 step 10/22 | loss" in piped.stdout and "step/s" not in piped.stdout
    # A pseudo-terminal of a real size (a 0-column one gets no bar from tqdm), as a person's terminal has.
    command = " ".join(["stty cols 120 rows 40;", sys.executable, "-m", "launcher", *args, "run.dir=tty"])
    terminal = subprocess.run(["script", "-qec", command, "/dev/null"], cwd=tmp_path, capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert terminal.returncode == 0, terminal.stdout
    assert "epoch 1/2:" in terminal.stdout and "step/s" in terminal.stdout  # tqdm's bar, with its ETA
    assert "epoch 1 step 10/22 | loss" not in terminal.stdout
    assert "epoch 2/2 | train loss" in terminal.stdout and "done: 44 steps" in terminal.stdout


def test_plot_writes_a_png_of_a_real_run(tmp_path):
    check_ok(launch(["recipe=digits", "run.dir=run", "train.epochs=3", "train.log_every=5", "wandb.mode=disabled"],
                    tmp_path))
    result = subprocess.run([sys.executable, "-m", "launcher.plot", "run"], cwd=tmp_path, capture_output=True,
                            text=True)
    assert result.returncode == 0 and "wrote run/metrics.png" in result.stdout
    png = (tmp_path / "run" / "metrics.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk
    assert width >= 800 and height >= 300
