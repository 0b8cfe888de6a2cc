"""ckpt.remote's logic in one process, on a file:// store: verified uploads and downloads, manifests that name only
their own files, one writer per prefix, and the starts a store refuses."""

import json
import os
import threading
import time

import pytest
import torch
from omegaconf import OmegaConf

from launcher.checkpoint.files import BadCheckpoint, save_atomic
from launcher.checkpoint.remote import MANIFEST_SUFFIX, RemoteStore, StoreHoldsAnotherRun
from launcher.errors import LauncherError, UserError
from launcher.run.lock import Holder
from launcher.run.mirror import HOLDER, Mirror

RUN_1 = {"run_id": "run-1", "config": {}}


def config(remote: str, resume: str = "auto"):
    return OmegaConf.create({"ckpt": {"remote": remote, "keep": 2, "resume": resume, "remote_wait_s": 30.0}})


@pytest.fixture
def checkpoints(tmp_path):
    """A run directory's checkpoints: a file one, and a folder one (as dist.strategy=fsdp writes)."""
    folder = tmp_path / "run" / "checkpoints"
    save_atomic({"global_step": 5, "weights": torch.arange(10.0)}, folder / "step_000000005.pt")
    (folder / "step_000000006").mkdir()
    for name in (".metadata", "__0_0.distcp", "launcher.pt"):
        (folder / "step_000000006" / name).write_bytes(os.urandom(100))
    return folder


def test_checkpoints_go_up_whole_and_come_back_verified(tmp_path, checkpoints):
    store = RemoteStore(f"file://{tmp_path}/store")
    for name in ("step_000000005.pt", "step_000000006"):
        assert store.upload_checkpoint(checkpoints / name, RUN_1)
        assert not store.upload_checkpoint(checkpoints / name, RUN_1)  # there already, unchanged: not again
    assert store.checkpoint_names() == ["step_000000006", "step_000000005.pt"]
    assert sorted(store.manifest("step_000000006")["files"]) == [
        "step_000000006/.metadata", "step_000000006/__0_0.distcp", "step_000000006/launcher.pt"]
    restored = tmp_path / "restored"
    for name in ("step_000000005.pt", "step_000000006"):
        store.download_checkpoint(name, restored)
    assert (restored / "step_000000005.pt").read_bytes() == (checkpoints / "step_000000005.pt").read_bytes()
    assert (restored / "step_000000006" / "launcher.pt").read_bytes() == (
        checkpoints / "step_000000006" / "launcher.pt").read_bytes()


def test_a_corrupt_or_forged_checkpoint_in_the_store_is_refused_and_leaves_nothing(tmp_path, checkpoints):
    store = RemoteStore(f"file://{tmp_path}/store")
    store.upload_checkpoint(checkpoints / "step_000000006", RUN_1)
    shard = tmp_path / "store" / "checkpoints" / "step_000000006" / "__0_0.distcp"
    shard.write_bytes(bytes(100))  # same size, other bytes
    with pytest.raises(BadCheckpoint, match="__0_0.distcp has size and CRC-32"):
        store.download_checkpoint("step_000000006", tmp_path / "restored")
    assert not list((tmp_path / "restored").iterdir())  # nothing half-downloaded stays
    forged = {"run_id": "run-1", "files": {"step_000000007/../../../escaped": [1, 0]}}
    store.write(f"checkpoints/step_000000007{MANIFEST_SUFFIX}", json.dumps(forged).encode())
    with pytest.raises(BadCheckpoint, match="names files outside it"):
        store.download_checkpoint("step_000000007", tmp_path / "restored")


def test_a_checkpoint_is_gone_from_the_store_once_its_manifest_is(tmp_path, checkpoints):
    store = RemoteStore(f"file://{tmp_path}/store")
    store.upload_checkpoint(checkpoints / "step_000000006", RUN_1)
    store.remove_checkpoint("step_000000006")
    assert store.checkpoint_names() == [] and not list((tmp_path / "store" / "checkpoints").rglob("*.distcp"))


def test_an_upload_that_does_not_read_back_whole_fails(tmp_path, checkpoints, monkeypatch):
    store = RemoteStore(f"file://{tmp_path}/store")
    monkeypatch.setattr(store.fs, "put_file", lambda local, remote: store.fs.pipe_file(remote, b"torn"))
    with pytest.raises(OSError, match="the uploaded copy has size and CRC-32"):
        store.upload_checkpoint(checkpoints / "step_000000005.pt", RUN_1)
    assert store.checkpoint_names() == []  # no manifest: not there


def test_a_url_with_credentials_or_without_a_scheme_is_refused_without_being_echoed():
    from launcher.config.build import build_config, parse_overrides, validate

    def check(value: str) -> None:
        validate(build_config({}, {}, parse_overrides([f"ckpt.remote={value}"]), "test"), 1, 1)

    for value in ("s3://AKIA:hunter2@bucket/runs", "https://host/runs?sig=hunter2", "bucket/runs", "s3://",
                  "s3://hunter2@bucket/runs", "s3://AKIA%3Ahunter2@bucket/runs", "s3://bucket/runs#hunter2",
                  "abfs://AKIA:hunter2@account.dfs.core.windows.net/runs", "gs://bucket/runs?hunter2#x"):
        with pytest.raises(UserError, match="ckpt.remote must be") as refused:
            check(value)
        assert "hunter2" not in str(refused.value)
    check("s3://bucket/runs/a")
    check("abfs://container@account.dfs.core.windows.net/runs")  # a container, not a user


def write_holder(store_folder, holder: Holder, age_s: float = 0.0) -> None:
    path = store_folder / HOLDER
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(holder.__dict__))
    os.utime(path, (time.time() - age_s, time.time() - age_s))


def never_stopped(doing):
    pass


def test_one_writer_per_prefix(tmp_path, monkeypatch):
    url, store_folder = f"file://{tmp_path}/store", tmp_path / "store"
    alive = Holder.this_process("job-1")  # this very process, under another token: a live writer
    write_holder(store_folder, alive)
    with pytest.raises(UserError, match="is in use by another job"):
        Mirror.open(config(url), tmp_path / "run", "job-2", (0, 0), never_stopped)
    dead = Holder(**{**alive.__dict__, "pid": 2**22 + 1, "started": "1"})  # no such process on this host
    write_holder(store_folder, dead)
    Mirror.open(config(url), tmp_path / "run", "job-2", (0, 0), never_stopped).close()
    monkeypatch.setattr("launcher.run.lock.STALE_S", 0.5)
    elsewhere = Holder(**{**alive.__dict__, "host": "another-host"})
    write_holder(store_folder, elsewhere, age_s=3600)  # its clock is no judge: watched, and nothing rewrites it
    mirror = Mirror.open(config(url), tmp_path / "run", "job-2", (0, 0), never_stopped)
    assert Holder.parse((store_folder / HOLDER).read_bytes()) == mirror.lease.me
    mirror.close()
    assert not (store_folder / HOLDER).exists()  # given back
    earlier = Holder(**{**elsewhere.__dict__, "job": "job-3", "attempt": (0, 0)})  # requeued: at once
    write_holder(store_folder, earlier)
    Mirror.open(config(url), tmp_path / "run", "job-3", (1, 0), never_stopped).close()

    def rewritten_meanwhile(doing):  # a live writer elsewhere: its heartbeat moves while it is watched
        write_holder(store_folder, elsewhere, age_s=-5)

    write_holder(store_folder, elsewhere)
    with pytest.raises(UserError, match="is in use by another job"):
        Mirror.open(config(url), tmp_path / "run", "job-2", (0, 0), rewritten_meanwhile)


def test_a_taken_over_prefix_stops_the_uploads(tmp_path):
    mirror = Mirror.open(config(f"file://{tmp_path}/store"), tmp_path / "run", None, (0, 0), never_stopped)
    write_holder(tmp_path / "store", Holder(**{**mirror.lease.me.__dict__, "token": "another"}))
    with pytest.raises(Exception, match="was taken over by another job"):
        mirror.lease.check()
    assert "was taken over by another job" in mirror.lost
    mirror.close()
    assert (tmp_path / "store" / HOLDER).exists()  # the other's: left alone


def test_a_store_holding_another_run_is_refused(tmp_path):
    url, store_folder = f"file://{tmp_path}/store", tmp_path / "store"
    store_folder.mkdir()
    (store_folder / "run.json").write_text(json.dumps({"run_id": "theirs", "config": {}}))
    with pytest.raises(UserError, match="ckpt.resume=never would start another run over it"):
        Mirror.open(config(url, resume="never"), tmp_path / "run", None, (0, 0), never_stopped)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text(json.dumps({"run_id": "ours", "config": {}}))
    with pytest.raises(UserError, match="holds run theirs, but run.dir=.* holds run ours"):
        Mirror.open(config(url), tmp_path / "run", None, (0, 0), never_stopped)


def test_an_unreachable_store_stops_only_a_start_that_may_need_it(tmp_path, caplog):
    (tmp_path / "not-a-folder").write_text("")
    url = f"file://{tmp_path}/not-a-folder/store"  # every write fails, as a store that cannot be reached
    with pytest.raises(LauncherError, match="cannot be read .* does not start it over"):
        Mirror.open(config(url), tmp_path / "empty", None, (0, 0), never_stopped)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text(json.dumps({"run_id": "ours", "config": {}}))
    Mirror.open(config(url), tmp_path / "run", None, (0, 0), never_stopped).close()
    assert "training goes on" in caplog.text


def test_a_missing_object_is_a_corrupt_checkpoint_and_another_runs_is_never_replaced(tmp_path, checkpoints):
    store = RemoteStore(f"file://{tmp_path}/store")
    store.upload_checkpoint(checkpoints / "step_000000005.pt", RUN_1)
    (tmp_path / "store" / "checkpoints" / "step_000000005.pt").unlink()
    with pytest.raises(BadCheckpoint, match="is missing from the store"):
        store.download_checkpoint("step_000000005.pt", tmp_path / "restored")
    with pytest.raises(StoreHoldsAnotherRun, match="of run run-1, not this run"):
        store.upload_checkpoint(checkpoints / "step_000000005.pt", {**RUN_1, "run_id": "run-2"})


def begun(tmp_path, run_id: str = "ours") -> Mirror:
    (tmp_path / "run").mkdir(exist_ok=True)
    (tmp_path / "run" / "run.json").write_text(json.dumps({"run_id": run_id, "config": {}}))
    (tmp_path / "run" / "history.jsonl").write_text('{"event": "start"}\n')
    mirror = Mirror.open(config(f"file://{tmp_path}/store"), tmp_path / "run", None, (0, 0), never_stopped)
    mirror.begin(None)
    return mirror


def test_the_ledger_asked_for_during_its_own_upload_is_uploaded_again(tmp_path, monkeypatch):
    mirror, writing, go_on = begun(tmp_path), threading.Event(), threading.Event()
    write = mirror.store.write

    def slow_write(name, data):
        if name == "history.jsonl" and not go_on.is_set():
            writing.set()
            go_on.wait(10)
        write(name, data)

    monkeypatch.setattr(mirror.store, "write", slow_write)
    mirror.model_saved(tmp_path / "run" / "run.json")  # any file: what matters is the ledger after it
    assert writing.wait(10)
    with (tmp_path / "run" / "history.jsonl").open("a") as history:
        history.write('{"event": "end"}\n')  # the attempt ends while the ledger's first upload is under way
    closing = threading.Thread(target=mirror.close)  # which asks for the ledger again
    closing.start()
    wait_until = time.monotonic() + 10
    while mirror._ending_since is None and time.monotonic() < wait_until:  # asked for the ledger again
        time.sleep(0.01)
    go_on.set()
    closing.join(30)
    assert (tmp_path / "store" / "history.jsonl").read_text() == '{"event": "start"}\n{"event": "end"}\n'


def test_a_store_reached_late_that_holds_another_run_is_never_written(tmp_path):
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "run.json").write_text(json.dumps({"run_id": "theirs", "config": {}}))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text(json.dumps({"run_id": "ours", "config": {}}))
    mirror = Mirror(RemoteStore(f"file://{tmp_path}/store"), tmp_path / "run", Holder.this_process(None), 2)
    mirror.begin(None)  # as after a start that could not read the store: the run is checked before any upload
    mirror.close()
    assert "holds run theirs, but run.dir" in mirror.lost and not (tmp_path / "store" / HOLDER).exists()
    assert json.loads((tmp_path / "store" / "run.json").read_text())["run_id"] == "theirs"


def test_the_end_of_a_run_does_not_wait_forever_for_a_hung_store(tmp_path, monkeypatch):
    monkeypatch.setattr("launcher.run.mirror.STALL_S", 0.5)
    mirror, hung = begun(tmp_path), threading.Event()
    monkeypatch.setattr(mirror.store, "upload_checkpoint", lambda *args, **kwargs: hung.wait(60))
    mirror.model_saved(tmp_path / "run" / "run.json")
    began = time.monotonic()
    mirror.close()
    assert time.monotonic() - began < 10
    hung.set()


def test_a_run_ending_while_the_store_fails_waits_exit_wait_s_in_all_the_release_included(tmp_path, monkeypatch):
    mirror = begun(tmp_path)
    mirror.end_wait_s = 2.0

    def refused_slowly(*args, **kwargs):  # as a store that is down: each call fails after its retries
        time.sleep(2.0)
        raise OSError("connection refused")

    for method in ("read", "write", "replace", "touch", "remove", "modified", "upload_checkpoint"):
        monkeypatch.setattr(mirror.store, method, refused_slowly)
    mirror.model_saved(tmp_path / "run" / "run.json")
    began = time.monotonic()
    mirror.drain()
    mirror.close()
    assert time.monotonic() - began < 2.0 + 1.0  # not another try of the store's to give the prefix back


def test_malformed_manifests_are_corrupt_checkpoints_and_a_run_json_naming_no_run_is_one_line(tmp_path, checkpoints):
    store = RemoteStore(f"file://{tmp_path}/store")
    store.upload_checkpoint(checkpoints / "step_000000005.pt", RUN_1)
    name = f"checkpoints/step_000000005.pt{MANIFEST_SUFFIX}"
    good = json.loads(store.read(name))
    for files, problem in [({"step_000000005.pt/x": [1, 2]}, "names files outside it"),
                           ({"step_000000005.pt": None}, "gives step_000000005.pt null, not a size and a CRC-32"),
                           ({"step_000000005.pt": [True, 1]}, "not a size and a CRC-32"), ({}, "names files outside")]:
        store.write(name, json.dumps({**good, "files": files}).encode())
        with pytest.raises(BadCheckpoint, match=problem):
            store.download_checkpoint("step_000000005.pt", tmp_path / "restored")
    store.write(name, b"{")
    with pytest.raises(BadCheckpoint, match="its manifest is missing or does not parse"):
        store.download_checkpoint("step_000000005.pt", tmp_path / "restored")
    store.remove(name)
    store.write("run.json", b"\x00garbage")  # and no checkpoint to tell its run by: one line, nothing written
    with pytest.raises(UserError, match="its run.json does not parse, and no checkpoint's manifest names its run"):
        Mirror.open(config(f"file://{tmp_path}/store"), tmp_path / "empty", None, (0, 0), never_stopped)
    assert not (tmp_path / "empty").exists() and store.read(HOLDER) is None
