"""Checkpoints in object storage (ckpt.remote), against a real S3 API: moto's server on localhost, through s3fs. A run
whose machine is lost continues from the store, a corrupt object is skipped, and a store that goes away while a run
trains costs it nothing."""

import json
import shutil
import signal
import socket
import subprocess
import sys
import time

import fsspec
import pytest
from helpers import (
    ARGS,
    RECIPE,
    assert_identical,
    check_ok,
    launch,
    load_weights,
    reference_weights,
    start,
    wait_for,
)

SECRET = "s3cret-never-printed-0x5eed"  # the store's secret key: it must appear in no output and no file


class S3Server:
    """moto's S3 server on a port of localhost, in a process of its own: stopped, it forgets every object."""

    def __init__(self, log_folder):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.log, self.process = log_folder / "moto.log", None
        self.env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}", "AWS_ACCESS_KEY_ID": "launcher-tests",
                    "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}

    def start(self, bucket: str = "runs") -> "S3Server":
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=self.log.open("a"), stderr=subprocess.STDOUT)
        try:
            wait_for(self._listening, "moto's server", 60)
            self.fs().mkdir(bucket)
        except BaseException:
            self.stop()  # never left running past the test
            raise
        return self

    def _listening(self) -> bool:
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)

    def fs(self):
        """An s3fs file system on the server, fresh (no cached listings)."""
        return fsspec.filesystem("s3", skip_instance_cache=True, endpoint_url=self.env["AWS_ENDPOINT_URL"],
                                 key="launcher-tests", secret=SECRET)


@pytest.fixture
def s3(tmp_path):
    server = S3Server(tmp_path).start()
    yield server
    if server.process.poll() is None:
        server.stop()


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "interruptible.py").write_text(RECIPE)
    return tmp_path


def assert_no_secret(result_text: str, *folders) -> None:
    assert SECRET not in result_text
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                assert SECRET.encode() not in path.read_bytes(), path


def test_a_run_whose_directory_is_lost_continues_from_the_store_bitwise(workdir, s3):
    reference = reference_weights(workdir)
    command = [*ARGS, "run.dir=run", "dist.nproc_per_node=2", "ckpt.remote=s3://runs/lenet/a"]
    stopped = launch(command, workdir, env={**s3.env, "INTERRUPT": "1:30:SIGTERM"})
    assert stopped.returncode == 75, stopped.stdout + stopped.stderr
    stored = s3.fs().find("runs/lenet/a")
    assert "runs/lenet/a/checkpoints/step_000000040.pt.manifest.json" in stored  # uploaded before exit 75
    assert "runs/lenet/a/holder.json" not in stored  # given back
    shutil.rmtree(workdir / "run")  # the machine is gone; a new one runs the same command

    resumed = check_ok(launch(command, workdir, env=s3.env))
    assert "restored run" in resumed.stdout and "(checkpoint step_000000040.pt)" in resumed.stdout
    assert "resumed from run/checkpoints/step_000000040.pt" in resumed.stdout
    assert_identical(load_weights(workdir / "run"), reference)
    starts = [json.loads(line) for line in (workdir / "run" / "history.jsonl").read_text().splitlines()]
    assert [event["event"] for event in starts] == ["start", "end", "start", "end"]  # the ledger came back too
    assert starts[2]["restored_from"] == {"remote": "s3://runs/lenet/a", "checkpoint": "step_000000040.pt"}
    stored = s3.fs().find("runs/lenet/a")
    assert "runs/lenet/a/model.pt" in stored
    assert len([name for name in stored if name.startswith("runs/lenet/a/checkpoints/step_")
                and name.endswith(".manifest.json")]) == 3  # pruned to ckpt.keep
    assert_no_secret(stopped.stdout + stopped.stderr + resumed.stdout + resumed.stderr, workdir)


def test_a_corrupt_newest_object_in_the_store_is_skipped_for_the_one_before(workdir, s3):
    reference = reference_weights(workdir, nproc=None)
    command = [*ARGS, "run.dir=run", "ckpt.remote=s3://runs/b"]
    check_ok(launch([*command, "train.epochs=2"], workdir, env=s3.env))
    newest, before = sorted(s3.fs().glob("runs/b/checkpoints/step_*.pt"))[-1:-3:-1]
    assert newest.endswith("step_000000044.pt")  # the run's last; the one before is whichever the uploads reached
    data = bytearray(s3.fs().cat_file(newest))
    data[len(data) // 2] ^= 0xFF  # one flipped byte, the size unchanged
    s3.fs().pipe_file(newest, bytes(data))
    shutil.rmtree(workdir / "run")

    resumed = check_ok(launch([*command, "train.epochs=3"], workdir, env=s3.env))
    assert "checkpoint step_000000044.pt is corrupt" in resumed.stdout + resumed.stderr
    assert f"resumed from run/checkpoints/{before.rsplit('/', 1)[1]}" in resumed.stdout
    assert_identical(load_weights(workdir / "run"), reference)


def test_training_goes_on_while_the_store_is_down_and_uploads_when_it_returns(workdir, s3):
    command = [*ARGS, "run.dir=run", "ckpt.remote=s3://runs/c", "log.level=info"]
    job = start(command, workdir, env={**s3.env, "STEP_SLEEP": "0.3"})
    local = workdir / "run" / "checkpoints"
    wait_for(lambda: s3.fs().glob("runs/c/checkpoints/*.manifest.json"), "a first upload", 120)
    s3.stop()
    down_at = max(path.name for path in local.glob("step_*"))
    wait_for(lambda: "an upload failed" in job.output.read_text() or job.poll() is not None, "the warning", 120)
    time.sleep(1)
    assert job.poll() is None, job.output.read_text()  # still training
    s3.start()  # a new, empty store: what the run uploads now, it uploads after the outage
    assert job.wait(timeout=300) == 0, job.output.read_text()
    output = job.output.read_text()
    assert "reachable again" in output
    assert max(path.name for path in local.glob("step_*")) > down_at  # checkpoints went on while it was down
    fs, newest = s3.fs(), max(local.glob("step_*"))
    assert fs.cat_file(f"runs/c/checkpoints/{newest.name}") == newest.read_bytes()
    assert fs.cat_file("runs/c/model.pt") == (workdir / "run" / "model.pt").read_bytes()
    assert fs.cat_file("runs/c/history.jsonl") == (workdir / "run" / "history.jsonl").read_bytes()
    assert_no_secret(output, workdir / "run")


def test_a_second_job_on_the_same_prefix_is_refused_while_the_first_writes(workdir, s3):
    first = start([*ARGS, "run.dir=one", "ckpt.remote=s3://runs/d"], workdir, env={**s3.env, "STEP_SLEEP": "0.1"})
    wait_for(lambda: s3.fs().exists("runs/d/holder.json"), "the first job's hold on the prefix", 120)
    second = launch([*ARGS, "run.dir=two", "ckpt.remote=s3://runs/d"], workdir, env=s3.env)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == 75
    assert second.returncode == 2, second.stdout + second.stderr
    assert "ckpt.remote=s3://runs/d is written by another job" in second.stderr
