"""Every way a run ends is clean: no false failures at exit, signals that stop and never orphan, one line for every
mistake, wandb that never holds the end up, sweeps parsed one way."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    ARGS,
    RECIPE,
    REPO,
    assert_user_error,
    check_ok,
    descendants,
    error_lines,
    history,
    launch,
    launcher_environ,
    launcher_lines,
    offline_runs,
    read_metrics,
    start,
    wait_for,
    wandb_records,
    without_credentials,
)

TESTS = Path(__file__).resolve().parent
DIGITS = ["recipe=digits", "wandb.mode=disabled"]


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "interruptible.py").write_text(RECIPE)
    return tmp_path


def busy_core():
    """A process that keeps one core busy: gloo's threads then get the CPU late, as on a loaded machine."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def exit_trials(trials: int, workdir: Path, args: list[str]) -> dict:
    load = busy_core()
    try:
        result = subprocess.run([sys.executable, str(TESTS / "exit_trials.py"), str(trials), str(workdir), *args],
                                capture_output=True, text=True, timeout=900)
    finally:
        load.kill()
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


# 1. No false failures at exit. A worker ends with os._exit (cli/main.py's exit_process), so gloo's threads never meet
# a finalizing interpreter: the abort (1 start in 30 before it) cannot happen by construction. These starts run both
# ends for real through the interpreter's own end; 12 catch a 1-in-10 regression with probability 0.72, and every CI
# run adds its own.
def test_two_process_starts_end_without_an_abort(tmp_path):
    check_ok(launch([*DIGITS, "run.dir=used", "train.epochs=1"], tmp_path))
    finished = exit_trials(4, tmp_path, [*DIGITS, "run.dir=ok{trial}", "train.max_steps=4", "ckpt.every_steps=2",
                                         "dist.stop_check_every=1", "train.log_every=1"])
    refused = exit_trials(8, tmp_path, [*DIGITS, "run.dir=used", "model.channels=16"])  # an error after collectives
    assert finished["abnormal"] == [] and refused["abnormal"] == [], finished["abnormal"] + refused["abnormal"]
    assert all((tmp_path / f"ok{trial}" / "model.pt").exists() for trial in range(4))


# 2. Signals.
def run_then_signal(workdir, args, signum, run="run", then=None, first=None, env=None):
    """Start a slow run in ``run``, send ``signum`` to its first process once a checkpoint exists (after ``first``, if
    given); returns (process, the file of its output)."""
    job = start([*ARGS, f"run.dir={run}", "wandb.mode=disabled", *args], workdir,
                env={"STEP_SLEEP": "0.02", **(env or {})})
    wait_for(lambda: list((workdir / run / "checkpoints").glob("step_*.pt")), "a first checkpoint")
    if first:
        first(job)
    workers = descendants(job.pid)
    os.kill(job.pid, signum)
    if then:
        then(job)
    job.wait(timeout=120)
    wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), "the workers to end", 30)
    return job, job.output


def ended(run_dir: Path) -> dict:
    return json.loads((run_dir / "history.jsonl").read_text().splitlines()[-1])


def stacks(workdir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher.stacks", "run"], cwd=workdir, env=launcher_environ(None),
                          capture_output=True, text=True, timeout=60)


def show_live_stacks(job) -> None:
    """A live run's stacks, shown without disturbing it (the signal test then stops it as ever)."""
    shown = stacks(job.output.parent)
    assert shown.returncode == 0, shown.stderr
    for rank in (0, 1):
        assert f"== rank {rank} (" in shown.stdout
    assert shown.stdout.count("Thread MainThread:") == 2
    assert shown.stdout.count(", in fit\n") == 2  # each rank in the training loop: a step, or an evaluation
    assert shown.stdout.rstrip().endswith("2 rank(s) answered")
    assert not list((job.output.parent / "run" / "stacks").iterdir())  # the request and answers, once shown
    assert job.poll() is None  # still training


# SIGINT to the parent: test_ctrl_c_to_the_first_run_command_... (torchrun's workers are in sessions of their own,
# so Ctrl-C reaches the parent alone). SIGUSR1 takes SIGUSR2's path everywhere (distributed/stop.py).
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR2])
def test_a_stop_signal_to_the_parent_stops_every_worker_with_a_checkpoint(workdir, signum):
    live = show_live_stacks if signum == signal.SIGTERM else None
    longer = ["train.epochs=50"] if live else []  # still training after the stacks are shown
    job, output = run_then_signal(workdir, ["dist.nproc_per_node=2", *longer], signum, first=live)
    text = output.read_text()
    assert job.returncode == 75, text
    assert "launcher: stopped after step" in text and f"({signal.Signals(signum).name})" in text
    assert "Traceback" not in text and "SignalException" not in text and "closing signal" not in text
    assert ended(workdir / "run")["outcome"] == "stopped"
    if live:  # no run is training there any more: said in one line
        idle = stacks(workdir)
        assert idle.returncode == 1 and "no rank answered within 2 s: is a run training in run?" in idle.stderr


def test_ctrl_c_on_one_process_stops_with_a_checkpoint_and_a_second_one_aborts(workdir):
    job, output = run_then_signal(workdir, [], signal.SIGINT)
    assert job.returncode == 75 and "Traceback" not in output.read_text(), output.read_text()
    def again(job):  # once the first has reached the workers (two signals in a row would merge into one)
        wait_for(lambda: "closing signal SIGINT" in job.output.read_text(), "the first Ctrl-C forwarded")
        os.kill(job.pid, signal.SIGINT)

    job, output = run_then_signal(workdir, ["dist.nproc_per_node=2"], signal.SIGINT, run="twice", then=again,
                                  env={"LOGLEVEL": "WARNING"})  # torchrun's own lines: where it passes a signal on
    text = output.read_text()
    assert job.returncode == 130, text
    assert "second stop signal" in text and "aborting at once, without a checkpoint" in text
    assert "Traceback" not in text


WAITS_FOR_CTRL_C = textwrap.dedent("""
    import os, signal, time
    from pathlib import Path
    import torch.nn.functional as F
    from launcher.recipes.digits import DEFAULTS, build_datasets, build_model

    steps = 0

    def loss(outputs, targets):
        # At its 7th step, with WAIT_FOR_CTRL_C set, each rank waits for its stop signal: the test sends it once every
        # rank waits, so the run is still training when it comes, however slow the machine.
        global steps
        steps += not outputs.is_meta  # rank 0 counts the model's FLOPs on meta tensors first
        if steps == 7 and os.environ.get("WAIT_FOR_CTRL_C"):
            came, stop = [], signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, lambda *args: (came.append(1), stop(*args)))
            Path(f"waiting.{os.environ['RANK']}").touch()
            while not came:
                time.sleep(0.01)
        return F.cross_entropy(outputs, targets)
""")


def test_ctrl_c_to_the_first_run_command_stops_in_one_line_and_the_same_command_continues(tmp_path):
    """README's first command, with Ctrl-C as a terminal sends it (SIGINT to the command's process group)."""
    (tmp_path / "waits.py").write_text(WAITS_FOR_CTRL_C)
    first_run = re.search(r"## The first run\n\n```bash\n(.*?)\n```", (REPO / "README.md").read_text()).group(1)
    command = [sys.executable if word == "python" else word for word in shlex.split(first_run)]
    command = [word.replace("recipe=digits", "recipe=waits.py") for word in command]
    command += ["train.epochs=2", "wandb.mode=disabled"]
    output = tmp_path / "first.out"
    job = subprocess.Popen(command, cwd=tmp_path, env=launcher_environ({"WAIT_FOR_CTRL_C": "1"}),
                           stdout=output.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    wait_for(lambda: (tmp_path / "waiting.0").exists() and (tmp_path / "waiting.1").exists(), "both ranks waiting")
    os.killpg(job.pid, signal.SIGINT)
    assert job.wait(timeout=120) == 75
    text = output.read_text()
    said = [line for line in text.splitlines() if line.startswith("launcher: ") and " | " not in line]
    assert len(said) == 1 and re.fullmatch(r"launcher: stopped after step \d+ \(SIGINT\): checkpoint written to "
                                           r"\S+; run the same command to continue", said[0]), text
    assert "Traceback" not in text and "torch/distributed" not in text, text  # nor torchrun's warnings
    assert "closing signal" not in text
    (run_dir,) = (tmp_path / "runs" / "waits").iterdir()
    assert ended(run_dir)["outcome"] == "stopped"
    assert "2 process(es), backend gloo, device cpu, 1 CPU thread(s) each" in text  # OMP_NUM_THREADS=1 here
    again = check_ok(subprocess.run(command, cwd=tmp_path, env=launcher_environ(None), capture_output=True,
                                    text=True, timeout=300, check=False))
    assert "resumed from runs/waits/" in again.stdout


def test_workers_whose_parent_is_killed_stop_gracefully_and_do_not_run_on(workdir):
    job, _ = run_then_signal(workdir, ["dist.nproc_per_node=2"], signal.SIGKILL)
    assert job.returncode == -9
    assert ended(workdir / "run")["outcome"] == "stopped"  # written by rank 0 after the parent died
    assert "(SIGHUP)" in ended(workdir / "run")["detail"]


def test_a_stop_under_torchrun_max_restarts_ends_the_job_and_says_stopped(workdir):
    status = workdir / "status"
    result = launch([*ARGS, "run.dir=run", "wandb.mode=disabled"], workdir, nproc=2, torchrun_args=["--max-restarts=3"],
                    env={"INTERRUPT": "1:30:SIGTERM", "LAUNCHER_STATUS_FILE": str(status)})
    assert result.returncode == 0, result.stderr
    assert "exit 0, so torchrun --max-restarts does not start the job again" in result.stderr
    assert status.read_text() == "stopped\n"
    starts = [e for e in map(json.loads, (workdir / "run" / "history.jsonl").read_text().splitlines())
              if e["event"] == "start"]
    assert len(starts) == 1 and ended(workdir / "run")["outcome"] == "stopped"


STUCK = textwrap.dedent("""
    import os, time
    import torch.nn.functional as F
    from launcher.recipes.digits import build_model, DEFAULTS, build_datasets

    steps = 0
    def stuck_here():
        time.sleep(300)  # a stuck rank: a deadlock, a dead file system

    def loss(outputs, targets):
        global steps
        steps += 1
        if os.environ["RANK"] == "1" and steps == 6:
            stuck_here()
        return F.cross_entropy(outputs, targets)
""")


def test_a_stuck_rank_is_named_with_its_line_and_the_job_ends_soon_after_the_timeout(tmp_path):
    (tmp_path / "stuck.py").write_text(STUCK)
    began = time.monotonic()
    result = launch(["recipe=stuck.py", "run.dir=x", "dist.timeout_s=4", "wandb.mode=disabled"], tmp_path, nproc=2,
                    timeout=200)
    elapsed = time.monotonic() - began
    assert result.returncode != 0
    line = ("rank 1 did not reach the step-6 gradient all-reduce within dist.timeout_s=4 s; it was in stuck_here "
            "(stuck.py:8), in the step-6 forward (every rank's stacks: x/stacks/")
    said = next(text for text in result.stderr.splitlines() if text.startswith("[rank 0] launcher: error: "))
    assert said.startswith(f"[rank 0] launcher: error: {line}")
    assert "[rank 1] launcher: SIGTERM: stopping at once, as rank 0 failed" in result.stderr
    assert "forcefully exiting via 9" not in result.stderr  # torchrun did not have to SIGKILL it after 30 s
    # torchrun's report names our line as the root cause, read from the error file we wrote.
    assert f"traceback : launcher: error: {line}" in result.stderr
    # Starting (about 8 s here), the timeout, the stacks (up to 2 s) and torchrun's teardown: well under a minute.
    assert elapsed < 4 + 50
    # Both ranks' stacks stay (the run, which never checkpointed, is taken away; the evidence is not).
    answers = tmp_path / said.rpartition("(every rank's stacks: ")[2].rstrip(")")
    stuck = (answers / "rank_1.txt").read_text()
    header = json.loads(stuck.partition("\n")[0])
    assert (header["rank"], header["step"], header["phase"]) == (1, 6, "forward")
    assert "Thread MainThread:" in stuck and "in stuck_here" in stuck and "launcher-stacks" in stuck
    waiting = (answers / "rank_0.txt").read_text()
    header = json.loads(waiting.partition("\n")[0])
    assert (header["step"], header["phase"]) == (6, "gradient all-reduce")
    assert "Where its collective timed out" in waiting
    assert not (tmp_path / "x" / "history.jsonl").exists()


DYING = textwrap.dedent("""
    import os
    import torch.nn.functional as F
    from launcher.recipes.digits import build_model, DEFAULTS, build_datasets

    steps = 0
    def loss(outputs, targets):
        global steps
        steps += 1
        if os.environ["RANK"] == "1" and steps == 3:
            os._exit(9)  # a rank that dies without a word
        if os.environ["RANK"] == "1" and steps == 2 and os.environ.get("RAISE"):
            raise ValueError("a bug in the recipe")
        return F.cross_entropy(outputs, targets)
""")


def test_a_rank_that_dies_mid_training_gets_one_line_from_the_other(tmp_path):
    (tmp_path / "dying.py").write_text(DYING)
    result = launch(["recipe=dying.py", "run.dir=x", "wandb.mode=disabled"], tmp_path, nproc=2,
                    torchrun_args=["--signals-to-handle=SIGUSR1"])  # torchrun's SIGTERM would end rank 0 first
    assert result.returncode != 0
    assert "[rank 0] launcher: error: stopped: another rank ended while this rank waited for it" in result.stderr
    assert "pair.cc" not in result.stderr.split("Root Cause")[0].replace("the backend said", "")


def test_an_error_in_the_recipe_shows_the_recipes_frames_not_the_engines(tmp_path):
    (tmp_path / "dying.py").write_text(DYING)
    result = launch(["recipe=dying.py", "run.dir=x", "wandb.mode=disabled"], tmp_path, nproc=2, env={"RAISE": "1"})
    assert result.returncode != 0
    line = "[rank 1] launcher: error: ValueError: a bug in the recipe"
    assert error_lines(result) == [line]  # not rank 0's too, which only lost rank 1
    assert "traceback : launcher: error: ValueError: a bug in the recipe" in result.stderr.split("Root Cause")[1]
    frames = result.stderr.split(line, 1)[1].split("[rank 0]")[0].split("Root Cause")[0]
    assert 'dying.py", line 13, in loss\n    raise ValueError("a bug in the recipe")' in frames
    assert "launcher/train.py" not in result.stderr and "launcher/worker.py" not in result.stderr


FAILING = textwrap.dedent("""
    import os, sys
    from launcher.recipes.digits import DEFAULTS, build_datasets, build_model as digits_model

    FAIL = os.environ["FAIL"]

    def build_model(cfg):
        if FAIL == "every rank exits":
            os._exit(9)  # before any collective: no rank sees another go
        if FAIL == "sys.exit":
            sys.exit(3)
        return digits_model(cfg)

    if FAIL == "rank 0 raises in evaluation":  # which rank 0 does alone, while rank 1 waits
        def metrics(outputs, batch):
            raise ValueError("a bug in metrics")
""")


@pytest.mark.parametrize("fail, code, line", [
    ("rank 0 raises in evaluation", 2, r"\[rank 0\] launcher: error: ValueError: a bug in metrics"),
    ("every rank exits", 1, r"launcher: error: worker rank \d exited with code 9 without saying why .*"),
    ("sys.exit", 2, r"\[rank \d\] launcher: error: SystemExit: 3"),
])
def test_a_job_that_fails_says_it_once(tmp_path, fail, code, line):
    """The rank that failed says it, and nobody else: not the rank that waited for it, nor the process that started
    them, which speaks only when no worker could."""
    (tmp_path / "failing.py").write_text(FAILING)
    result = launch(["recipe=failing.py", "dist.nproc_per_node=2", "train.epochs=1", "wandb.mode=disabled"], tmp_path,
                    env={"FAIL": fail})
    assert result.returncode == code, result.stdout + result.stderr
    said = launcher_lines(result)
    assert len(said) == 1 and re.fullmatch(line, said[0]), result.stdout + result.stderr
    assert "Traceback" not in result.stderr


# 3. One line for every mistake: exit 2, no traceback, before any worker starts where it can be.
def read_only_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "ro"
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], check=True)
    return folder


@pytest.mark.parametrize("args, message", [
    (["wandb.tags=[a,b"], "wandb.tags=[a,b is not a value (while parsing a flow sequence): close its bracket"),
    (['wandb.name="my'], 'wandb.name="my is not a value (while scanning a quoted scalar)'),
    (["recipe=/etc/hostname"], "recipe=/etc/hostname is not a Python file: a recipe file ends in .py"),
    (["recipe=./nonexist.py"], "recipe=nonexist.py: no such file (relative to "),
    (["train.seed=99999999999999999999"], "train.seed=99999999999999999999 must be in [0, 2**31)"),
    (["run.dir=afile"], "run.dir=afile is a file: give a directory"),
    (["run.dir=afile/run"], "run.dir=afile/run is under afile, which is a file"),
    (["run.dir=ro/run"], "run.dir=ro/run cannot be made: ro is not writable (Read-only file system)"),
])
def test_mistakes_get_one_line_before_any_worker_starts(tmp_path, args, message):
    (tmp_path / "afile").write_text("")
    read_only_dir(tmp_path)
    try:
        result = launch(["recipe=digits", "dist.nproc_per_node=2", *args], tmp_path)
        assert_user_error(result, message)
        assert "OMP_NUM_THREADS" not in result.stderr  # no worker was started
    finally:
        subprocess.run(["umount", str(tmp_path / "ro")], check=True)


def test_a_recipe_path_with_a_tilde_works_from_yaml_and_quoted(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "my_recipe.py").write_text("from launcher.recipes.digits import *\nDEFAULTS = {'model': {'width': 3}}\n")
    (tmp_path / "run.yaml").write_text("recipe: ~/my_recipe.py\n")
    for args in (["--config", "run.yaml"], ['recipe="~/my_recipe.py"']):
        result = check_ok(launch([*args, "--cfg"], tmp_path, env={"HOME": str(home)}))
        assert "width: 3" in result.stdout


def test_a_run_dir_error_under_torchrun_is_torchruns_root_cause(tmp_path):
    (tmp_path / "afile").write_text("")
    result = launch(["recipe=digits", "run.dir=afile"], tmp_path, nproc=2)
    assert_user_error(result, "run.dir=afile is a file", torchrun=True)
    assert "error_file: <N/A>" not in result.stderr.split("Root Cause")[1]
    assert "traceback : launcher: error: run.dir=afile is a file" in result.stderr


FILLING = textwrap.dedent("""
    import os
    import torch.nn.functional as F
    from pathlib import Path
    from launcher.recipes.digits import build_model, DEFAULTS, build_datasets

    steps = 0
    def loss(outputs, targets):
        global steps
        steps += 1
        if steps == 12 and os.environ["RANK"] == "0":  # something else fills the disk
            with open(Path(os.environ["FILL"]) / "filler", "wb") as file:
                try:
                    while True:
                        file.write(b"x" * 65536)
                        file.flush()
                except OSError:
                    pass
        return F.cross_entropy(outputs, targets)
""")


def test_a_full_disk_while_writing_a_checkpoint_is_one_line_and_keeps_the_previous_one(tmp_path):
    (tmp_path / "filling.py").write_text(FILLING)
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], check=True)
    try:
        result = launch(["recipe=filling.py", f"run.dir={disk}/run", "ckpt.every_steps=10", "wandb.mode=disabled"],
                        tmp_path, nproc=2, env={"FILL": str(disk)})
        assert result.returncode != 0
        (line,) = error_lines(result)
        assert f"launcher: error: writing checkpoint {disk}/run/checkpoints/step_000000020.pt failed (no space " \
               "left:" in line
        assert f"the previous checkpoint {disk}/run/checkpoints/step_000000010.pt is intact" in line
        assert torch.load(disk / "run" / "checkpoints" / "step_000000010.pt", weights_only=True)["global_step"] == 10
        assert "launcher/checkpoint.py" not in result.stderr and "inline_container" not in result.stderr
    finally:
        subprocess.run(["umount", str(disk)], check=True)


DIGITS_PARTS = "from launcher.recipes.digits import DEFAULTS, build_model, build_datasets\n"
# A recipe's mistakes that reach its import, its setup or its first step: (recipe, the line, a frame it must show).
RECIPE_MISTAKES = {
    "import": ("import numpyy_typo\n",
               "recipe=mistake.py failed to import: ModuleNotFoundError: No module named 'numpyy_typo'",
               'mistake.py", line 1, in <module>\n    import numpyy_typo'),
    "empty training set": (DIGITS_PARTS.replace("build_datasets", "build_datasets as digits") + textwrap.dedent("""
        import torch

        def build_datasets(cfg):
            return torch.utils.data.Subset(digits(cfg)[0], []), digits(cfg)[1]
        """), "the recipe's training set is empty", None),
    "parameters in no group": (DIGITS_PARTS + textwrap.dedent("""
        def param_groups(model, cfg):
            return [{"params": model[0].parameters()}]
        """), "the recipe's param_groups leave 4 trainable parameter(s) out of every group (2.weight, 2.bias, "
              "6.weight, 6.bias): add them to a group, or freeze them", None),
    "shapes that do not fit": (DIGITS_PARTS.replace("build_model, ", "") + textwrap.dedent("""
        from torch import nn

        class Head(nn.Module):
            def __init__(self):
                super().__init__()
                self.linear = nn.Linear(32, 10)

            def forward(self, images):
                return self.linear(images.flatten(1))

        def build_model(cfg):
            return Head()
        """), "RuntimeError: mat1 and mat2 shapes cannot be multiplied (32x64 and 32x10)",
        'mistake.py", line 11, in forward\n    return self.linear(images.flatten(1))'),
    "labels out of range": (DIGITS_PARTS.replace("build_datasets", "build_datasets as digits") + textwrap.dedent("""
        import torch

        def build_datasets(cfg):
            train, evaluation = digits(cfg)
            return torch.utils.data.TensorDataset(train.tensors[0], train.tensors[1] + 5), evaluation
        """), "IndexError: Target 1", None),
}


@pytest.mark.parametrize("mistake", sorted(RECIPE_MISTAKES))
def test_a_recipes_mistake_is_one_line_exit_2_and_leaves_no_run_directory(tmp_path, mistake):
    """Whether the recipe's code raised it (its frames shown) or torch did with what the recipe gave it (its model,
    its data): one line however many ranks fail alike, and a run that trained no step leaves nothing behind, its
    wandb run included."""
    recipe, message, frame = RECIPE_MISTAKES[mistake]
    (tmp_path / "mistake.py").write_text(recipe)
    result = launch(["recipe=mistake.py", "dist.nproc_per_node=2"], tmp_path, env=without_credentials(tmp_path))
    assert result.returncode == 2, result.stderr
    lines = launcher_lines(result)  # not repeated by another rank, nor by the process that started them
    assert len(lines) == 1 and message in lines[0], result.stdout + result.stderr
    if frame:
        assert frame in result.stderr
    assert "Traceback" not in result.stderr and "site-packages" not in result.stderr
    assert not (tmp_path / "runs").exists()


# 4. wandb: its own environment variables, and never holding the end of a run.
def test_wandb_mode_auto_honours_wandb_environment_variables(tmp_path):
    check_ok(launch(["recipe=digits", "run.dir=off", "train.epochs=1"], tmp_path,
                    env={**without_credentials(tmp_path), "WANDB_MODE": "disabled"}))
    assert not (tmp_path / "off" / "wandb").exists()
    check_ok(launch(["recipe=digits", "run.dir=named", "train.epochs=1"], tmp_path,
                    env={**without_credentials(tmp_path), "WANDB_PROJECT": "from-env", "WANDB_RUN_GROUP": "g1"}))
    (offline,) = offline_runs(tmp_path / "named")
    run = next(record["run"] for record in wandb_records(offline) if record["type"] == "run")
    assert run["project"] == "from-env" and run["run_group"] == "g1"


class FailingServer:
    """A W&B server that answers every request with HTTP 500: online mode can connect, and then fails."""

    def __enter__(self):
        import http.server

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(500)
                self.end_headers()

            do_POST = do_GET

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc):
        self.server.shutdown()


def offline_run_finished(run_dir: Path) -> bool:
    try:
        (offline,) = offline_runs(run_dir)
        return any(record["type"] == "exit" for record in wandb_records(offline))
    except (ValueError, subprocess.CalledProcessError):  # not there yet, or still being written
        return False


def test_wandb_that_fails_online_falls_back_offline_with_every_record_without_holding_up_the_end(tmp_path):
    with FailingServer() as url:
        env = {**without_credentials(tmp_path), "WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": url,
               "WANDB_INIT_TIMEOUT": "20"}
        started = time.monotonic()
        result = check_ok(launch(["recipe=digits", "run.dir=run", "train.epochs=1", "train.log_every=5",
                                  "wandb.mode=online"], tmp_path, env=env))
        assert time.monotonic() - started < 19  # the end did not wait for wandb's 20 s online attempt
        assert "wandb is still finishing its run (pid" in result.stdout
        # In the background: the online start fails, the offline one takes over with every record.
        wait_for(lambda: offline_run_finished(tmp_path / "run"), "the offline run's last record", 120)
    (offline,) = offline_runs(tmp_path / "run")
    assert [row["_step"] for row in history(wandb_records(offline))] == [
        record["step"] for record in read_metrics(tmp_path / "run")]
    notices = (tmp_path / "run" / "wandb" / "wandb-process.log").read_text()
    assert "wandb could not start in online mode (" in notices and "logging offline instead" in notices
    assert "is in use" not in notices


def test_wandb_notices_are_written_around_the_progress_bar(tmp_path):
    command = " ".join(["stty cols 120 rows 40;", sys.executable, "-m", "launcher", "recipe=digits",
                        "train.epochs=2", "run.dir=tty", "train.log_every=5"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}
    env.pop("WANDB_API_KEY", None)
    terminal = subprocess.run(["script", "-qec", command, "/dev/null"], cwd=tmp_path, capture_output=True, text=True,
                              env=env)
    assert terminal.returncode == 0, terminal.stdout
    pieces = [piece for line in terminal.stdout.split("\n") for piece in line.split("\r")]
    notices = [piece for piece in pieces if "wandb:" in piece]
    assert notices and all(piece.startswith("wandb: offline run") for piece in notices), notices


# 5. Sweeps: one parser, quotes kept, errors named by file and line.
def test_a_sweep_task_line_is_split_as_a_shell_would_and_its_errors_name_the_line(tmp_path):
    (tmp_path / "sweep.txt").write_text('# lr sweep\ntrain.seed=1\n\nwandb.name="my run" optim.lr=0.1\n'
                                        "optim.lrr=0.2\n")
    result = check_ok(launch([*DIGITS, "--sweep-task", "sweep.txt:2", "--cfg"], tmp_path))
    assert "name: my run" in result.stdout and "lr: 0.1" in result.stdout
    bad = launch([*DIGITS, "--sweep-task", "sweep.txt:3", "--cfg"], tmp_path)
    assert_user_error(bad, "sweep.txt line 5: unknown key 'optim.lrr': did you mean optim.lr")
    dry = subprocess.run([sys.executable, "-m", "launcher.slurm", "array", "--sweep", "sweep.txt", "--dry-run",
                          "recipe=digits"], cwd=tmp_path, capture_output=True, text=True)
    assert dry.returncode == 2 and "sweep.txt line 5: unknown key 'optim.lrr'" in dry.stderr


# 6. Smaller ones.
def test_every_run_has_a_summary_and_the_docs_name_the_keys_a_run_records(tmp_path):
    check_ok(launch(["recipe=linreg", "run.dir=lin", "train.epochs=1", "wandb.mode=disabled"], tmp_path))
    assert "Total params: 3" in (tmp_path / "lin" / "summary.txt").read_text()
    documented = (REPO / "docs" / "configuration.md").read_text()
    recorded = {key for record in read_metrics(tmp_path / "lin") for key in record}
    for key in recorded:
        assert f"`{key}`" in documented, key


def test_slurm_helper_takes_a_config_file_and_asks_for_cpus(tmp_path):
    (tmp_path / "run.yaml").write_text("train:\n  epochs: 3\n")
    dry = subprocess.run([sys.executable, "-m", "launcher.slurm", "single", "--gpus-per-node", "2", "--config",
                          "run.yaml", "--dry-run", "recipe=digits"], cwd=tmp_path, capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    assert f"--config {tmp_path / 'run.yaml'}" in dry.stdout.splitlines()[0]
    assert "#SBATCH --cpus-per-task=8" in dry.stdout  # 4 per process
    (tmp_path / "bad.yaml").write_text("train:\n  epoch: 3\n")
    bad = subprocess.run([sys.executable, "-m", "launcher.slurm", "single", "--config", "bad.yaml", "--dry-run",
                          "recipe=digits"], cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode == 2 and "config file: unknown key 'train.epoch'" in bad.stderr
