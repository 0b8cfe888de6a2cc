"""Checkpoints in object storage (ckpt.remote), against a real S3 API: moto's server on localhost, through s3fs. A run
whose machine is lost continues from the store, whatever of it is corrupt, malformed or missing; another run is never
mixed into it; and a store that goes away while a run trains costs it nothing."""

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
    assert_user_error,
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


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A server that stays up, and a run's prefix in it: every object of a 2-epoch run (of 3 epochs' config), kept
    to be copied, altered, into a prefix of each test's own."""
    folder = tmp_path_factory.mktemp("stored")
    (folder / "interruptible.py").write_text(RECIPE)
    server = S3Server(folder).start()
    try:
        check_ok(launch([*ARGS, "run.dir=run", "ckpt.remote=s3://runs/base", "train.epochs=2"], folder,
                        env=server.env))
        fs = server.fs()
        server.objects = {path.removeprefix("runs/base/"): fs.cat_file(path) for path in fs.find("runs/base")}
        yield server
    finally:
        server.stop()


def prefix_of(server, name: str, changed: dict | None = None) -> str:
    """A prefix holding the stored run's objects, with ``changed`` ones replaced (None: deleted)."""
    fs = server.fs()
    for relative, data in {**server.objects, **(changed or {})}.items():
        if data is not None:
            fs.pipe_file(f"runs/{name}/{relative}", data)
    return f"s3://runs/{name}"


def manifest_of(server, name: str) -> dict:
    return json.loads(server.objects[f"checkpoints/{name}.manifest.json"])


def before_newest(server) -> str:
    """The stored checkpoint before the newest (step 44): whichever the uploads reached."""
    return sorted(path.split("/")[1].removesuffix(".manifest.json") for path in server.objects
                  if path.endswith(".manifest.json") and path.startswith("checkpoints/step_"))[-2]


def continue_from(workdir, server, url: str):
    """The stored run's command, on a machine whose run directory is gone: it continues from ``url``."""
    return launch([*ARGS, "run.dir=run", f"ckpt.remote={url}", "train.epochs=3"], workdir, env=server.env)


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


def test_a_corrupt_newest_object_in_the_store_is_skipped_for_the_one_before(workdir, stored):
    reference = reference_weights(workdir, nproc=None)
    data = bytearray(stored.objects["checkpoints/step_000000044.pt"])
    data[len(data) // 2] ^= 0xFF  # one flipped byte, the size unchanged
    url = prefix_of(stored, "corrupt", {"checkpoints/step_000000044.pt": bytes(data)})
    resumed = check_ok(continue_from(workdir, stored, url))
    assert "checkpoint step_000000044.pt is corrupt" in resumed.stdout + resumed.stderr
    assert f"resumed from run/checkpoints/{before_newest(stored)}" in resumed.stdout
    assert_identical(load_weights(workdir / "run"), reference)


def test_checkpoints_whose_run_json_was_never_uploaded_are_restored_by_their_manifests(workdir, stored):
    """A job killed after its first checkpoint's manifest and before its first ledger upload left exactly this."""
    reference = reference_weights(workdir, nproc=None)
    url = prefix_of(stored, "no-ledger", dict.fromkeys(["run.json", "history.jsonl", "config.yaml", "metrics.jsonl",
                                                         "summary.txt"]))
    resumed = check_ok(continue_from(workdir, stored, url))
    assert "restored run" in resumed.stdout and "resumed from run/checkpoints/step_000000044.pt" in resumed.stdout
    assert_identical(load_weights(workdir / "run"), reference)
    rebuilt = json.loads((workdir / "run" / "run.json").read_text())
    assert rebuilt["run_id"] == manifest_of(stored, "step_000000044.pt")["run_id"] and rebuilt["rebuilt_from"]
    assert json.loads(stored.fs().cat_file("runs/no-ledger/run.json")) == rebuilt  # the store's ledger whole again


@pytest.mark.parametrize("entry", ["step_000000044.pt/x", None], ids=["a-file-inside-a-file", "null"])
def test_a_malformed_manifest_is_a_corrupt_checkpoint_skipped_for_the_one_before(workdir, stored, entry):
    reference = reference_weights(workdir, nproc=None)
    manifest = manifest_of(stored, "step_000000044.pt")
    files = manifest["files"]
    manifest["files"] = {entry: files["step_000000044.pt"]} if entry else {"step_000000044.pt": None}
    url = prefix_of(stored, f"malformed-{entry is None}",
                    {"checkpoints/step_000000044.pt.manifest.json": json.dumps(manifest).encode()})
    resumed = check_ok(continue_from(workdir, stored, url))
    output = resumed.stdout + resumed.stderr
    assert "checkpoint step_000000044.pt is corrupt (its manifest" in output and "cannot be" not in output
    assert f"resumed from run/checkpoints/{before_newest(stored)}" in resumed.stdout
    assert_identical(load_weights(workdir / "run"), reference)


def test_a_garbage_run_json_in_the_store_is_told_from_the_manifests_never_started_over(workdir, stored):
    reference = reference_weights(workdir, nproc=None)
    url = prefix_of(stored, "garbage", {"run.json": b"\x00{garbage"})
    resumed = check_ok(continue_from(workdir, stored, url))
    assert "resumed from run/checkpoints/step_000000044.pt" in resumed.stdout
    assert_identical(load_weights(workdir / "run"), reference)
    assert json.loads(stored.fs().cat_file("runs/garbage/run.json"))["run_id"] == manifest_of(
        stored, "step_000000044.pt")["run_id"]


def test_another_run_on_a_prefix_holding_a_run_is_refused_before_anything_is_restored(workdir, stored):
    url = prefix_of(stored, "another")
    refused = launch([*ARGS, "run.dir=run", f"ckpt.remote={url}", "train.seed=1"], workdir, env=stored.env)
    assert_user_error(refused, f"ckpt.remote={url} holds run ")
    assert "train.seed 0 -> 1" in refused.stderr
    assert not (workdir / "run").exists()  # nothing restored, nothing left behind
    assert stored.fs().cat_file("runs/another/run.json") == stored.objects["run.json"]


def test_a_url_with_a_user_or_a_fragment_is_refused_without_echoing_it(workdir):
    for url in ("s3://TOKEN-7f3a@bucket/x", "s3://AKIA%3ATOKEN-7f3a@bucket/x", "s3://bucket/x#TOKEN-7f3a"):
        refused = launch([*ARGS, f"ckpt.remote={url}"], workdir)
        assert_user_error(refused, "ckpt.remote must be '' or a URL such as s3://bucket/prefix, with no credentials")
        assert "TOKEN-7f3a" not in refused.stdout + refused.stderr
    assert not (workdir / "runs").exists()


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


def test_a_run_that_ends_while_the_store_is_down_waits_for_it_as_documented_then_the_next_start_uploads(workdir,
                                                                                                         s3):
    command = [*ARGS, "run.dir=run", "ckpt.remote=s3://runs/e", "train.epochs=2", "ckpt.remote_wait_s=5"]
    job = start(command, workdir, env={**s3.env, "STEP_SLEEP": "0.1"})
    wait_for(lambda: s3.fs().glob("runs/e/checkpoints/*.manifest.json"), "a first upload", 120)
    s3.stop()  # for good: the run ends while it is down
    wait_for(lambda: "the run's end waits for it" in job.output.read_text() or job.poll() is not None, "the end", 300)
    waiting_since = time.monotonic()
    assert job.wait(timeout=300) == 0, job.output.read_text()
    # ckpt.remote_wait_s in all, the holder's release included (each try of a store that is down takes s3fs's
    # retries, seconds); the rest of the end takes a moment.
    assert time.monotonic() - waiting_since < 5 + 10
    assert "not uploaded (" in job.output.read_text()
    s3.start()  # a new, empty store: the same command uploads what the end left
    check_ok(launch(command, workdir, env=s3.env))
    fs, local = s3.fs(), workdir / "run"
    newest = max((local / "checkpoints").glob("step_*"))
    assert fs.cat_file(f"runs/e/checkpoints/{newest.name}") == newest.read_bytes()
    assert fs.cat_file("runs/e/model.pt") == (local / "model.pt").read_bytes()


def test_a_second_job_on_the_same_prefix_is_refused_while_the_first_writes(workdir, s3):
    # Epochs enough that the first job is still training when the second is refused, however slow the machine.
    first = start([*ARGS, "run.dir=one", "ckpt.remote=s3://runs/d", "train.epochs=1000"], workdir,
                  env={**s3.env, "STEP_SLEEP": "0.1"})
    wait_for(lambda: s3.fs().exists("runs/d/holder.json"), "the first job's hold on the prefix", 120)
    second = launch([*ARGS, "run.dir=two", "ckpt.remote=s3://runs/d"], workdir, env=s3.env)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == 75
    assert second.returncode == 2, second.stdout + second.stderr
    assert "ckpt.remote=s3://runs/d is in use by another job" in second.stderr
