"""The run directory's lock, its identity and the checkpoint checksums, in one process: the logic, fast."""

import json
import os
import random
import subprocess
import sys
import threading
import time
import zipfile
from dataclasses import asdict

import pytest
import torch
from omegaconf import OmegaConf

import launcher.run.lock as run_lock
from launcher.checkpoint.files import BadCheckpoint, save_atomic
from launcher.checkpoint.formats import load_checkpoint
from launcher.config.build import build_config, parse_overrides
from launcher.errors import UserError
from launcher.recipe import load_recipe
from launcher.run.directory import derived_name
from launcher.run.lock import Holder, RunLock, check_shared
from launcher.run.start import _refuse_changes, config_changes


def write_holder(path, **fields):
    holder = {**asdict(Holder.this_process("other-job")), **fields}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(holder))


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_live_holder_is_named_and_a_second_job_refused(tmp_path):
    first = RunLock(tmp_path / "runs" / "x", job="a")
    first.acquire()
    with pytest.raises(UserError, match=r"is in use by another job \(job a, pid \d+ on .*, since .*\)"):
        RunLock(tmp_path / "runs" / "x", job="b").acquire()
    with pytest.raises(UserError, match="is in use by another job"):
        RunLock(tmp_path / "runs" / "x", job="b").check_free()
    first.release()
    assert not (tmp_path / "runs" / "x" / ".lock").exists()
    RunLock(tmp_path / "runs" / "x", job="b").check_free()


def test_the_lock_of_a_dead_process_is_taken_over_and_a_live_one_of_the_same_job_is_not(tmp_path, caplog):
    caplog.set_level("INFO")
    write_holder(tmp_path / ".lock", pid=dead_pid(), job="job-7")
    lock = RunLock(tmp_path, job="job-7")
    lock.acquire()
    assert "its process is gone" in caplog.text
    lock.release()
    # Two starts in one Slurm allocation share its job id: a holder is a process, and this one (this very
    # process) is alive.
    write_holder(tmp_path / ".lock", job="job-7")
    with pytest.raises(UserError, match=r"is in use by another job \(job job-7, pid"):
        RunLock(tmp_path, job="job-7").acquire()


def test_a_holder_in_another_pid_namespace_of_this_host_is_judged_by_its_heartbeat(tmp_path, monkeypatch):
    """Two containers of one host can share its name, not its pids: the holder's pid 6 means nothing here."""
    monkeypatch.setattr(run_lock, "STALE_S", 0.3)
    write_holder(tmp_path / ".lock", pid=dead_pid(), pid_namespace="pid:[1]")
    beating, stop = tmp_path / ".lock", threading.Event()
    thread = threading.Thread(target=lambda: [beating.touch() for _ in iter(lambda: stop.wait(0.05), True)])
    thread.start()
    try:
        with pytest.raises(UserError, match="in use by another job"):  # alive by its heartbeat, whatever its pid
            RunLock(tmp_path, job="new").acquire()
    finally:
        stop.set()
        thread.join()


def test_an_earlier_attempt_of_the_job_on_another_host_is_taken_over_at_once(tmp_path, monkeypatch, caplog):
    caplog.set_level("INFO")
    monkeypatch.setattr(run_lock, "STALE_S", 30)  # a heartbeat watch would time the test out
    write_holder(tmp_path / ".lock", host="elsewhere", job="job-7", attempt=[0, 2])
    lock = RunLock(tmp_path, job="job-7", attempt=(1, 0))  # requeued once by Slurm, torchrun counting afresh
    started = time.monotonic()
    lock.acquire()
    assert time.monotonic() - started < 5 and "an earlier attempt of this job" in caplog.text
    lock.release()


def test_the_same_attempt_of_the_job_on_another_host_is_judged_by_its_heartbeat(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "STALE_S", 0.5)
    write_holder(tmp_path / ".lock", host="elsewhere", job="job-7", attempt=[0, 0])
    lock = RunLock(tmp_path, job="job-7")
    lock.acquire()  # no beat for STALE_S: taken over
    lock.release()


NO_PROCESS = b'{"host": "vm", "pid": 1e999, "started": "1", "job": null, "token": "t", "since": "then"}'


@pytest.mark.parametrize("content", [b"", b'{"host": "vm", "pid": 12', b'{"owner": "someone", "pid": 1}', NO_PROCESS],
                         ids=["empty", "truncated", "foreign", "pid-overflowing"])
def test_a_lock_naming_no_holder_is_refused_in_seconds_then_taken_over_once_stale(tmp_path, monkeypatch, caplog,
                                                                                   content):
    caplog.set_level("INFO")
    monkeypatch.setattr(run_lock, "WRITE_GRACE_S", 0.3)
    (tmp_path / ".lock").write_bytes(content)
    started = time.monotonic()
    refusal = (r"run.dir=.*: .*\.lock (is empty|names no holder this version can read) \(a start killed while "
               r"writing it.* If no job uses it, delete it")
    with pytest.raises(UserError, match=refusal):
        RunLock(tmp_path, job="a").acquire()
    assert time.monotonic() - started < run_lock.WRITE_GRACE_S + 2
    old = time.time() - run_lock.STALE_S - 1
    os.utime(tmp_path / ".lock", (old, old))
    lock = RunLock(tmp_path, job="a")
    lock.acquire()
    assert "names no holder and nothing touched it for 6" in caplog.text
    lock.release()


def test_a_lock_being_written_is_waited_for(tmp_path):
    (tmp_path / ".lock").write_bytes(b"")
    holder = Holder.this_process("writer")
    later = threading.Timer(0.5, lambda: (tmp_path / ".lock").write_text(json.dumps(asdict(holder))))
    later.start()
    with pytest.raises(UserError, match=r"in use by another job \(job writer"):  # judged once written: alive
        RunLock(tmp_path, job="a").acquire()
    later.join()


def test_a_stop_signal_ends_any_wait_for_the_lock_at_once(tmp_path, monkeypatch):
    class Stopped(Exception):
        pass

    calls = []

    def check_stop(doing: str) -> None:
        calls.append(doing)
        if len(calls) > 3:
            raise Stopped(doing)

    monkeypatch.setattr(run_lock, "STALE_S", 600)
    write_holder(tmp_path / ".lock", host="elsewhere")
    started = time.monotonic()
    with pytest.raises(Stopped, match="watching the heartbeat of job other-job"):
        RunLock(tmp_path, job="new").acquire(check_stop)
    (tmp_path / ".lock").write_bytes(b"")
    calls.clear()
    with pytest.raises(Stopped, match=r"reading .*\.lock"):
        RunLock(tmp_path, job="new").acquire(check_stop)
    assert time.monotonic() - started < 3


def test_a_holder_on_another_host_is_dead_only_when_its_heartbeat_stops(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "STALE_S", 0.3)
    write_holder(tmp_path / ".lock", host="elsewhere")
    beating, stop = tmp_path / ".lock", threading.Event()

    def beat():
        while not stop.wait(0.05):
            beating.touch()

    thread = threading.Thread(target=beat)
    thread.start()
    try:
        with pytest.raises(UserError, match="in use by another job"):
            RunLock(tmp_path, job="new").acquire()
    finally:
        stop.set()
        thread.join()
    lock = RunLock(tmp_path, job="new")
    lock.acquire()  # no beat for STALE_S: taken over
    lock.release()


def test_a_lock_taken_away_is_noticed(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "BEAT_S", 0.05)
    lock = RunLock(tmp_path, job="a")
    lock.acquire()
    write_holder(tmp_path / ".lock", job="intruder")
    deadline = time.monotonic() + 10
    while not lock.lost and time.monotonic() < deadline:
        time.sleep(0.02)
    assert lock.lost
    lock.release()
    assert json.loads((tmp_path / ".lock").read_text())["job"] == "intruder"  # not ours to remove


def test_one_failed_read_of_its_own_lock_is_not_a_lost_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "BEAT_S", 0.05)
    lock = RunLock(tmp_path, job="a")
    lock.acquire()
    mine = (tmp_path / ".lock").read_bytes()
    (tmp_path / ".lock").write_bytes(b"")  # a passing error: unreadable for half a second
    time.sleep(0.5)
    (tmp_path / ".lock").write_bytes(mine)
    time.sleep(0.3)
    assert not lock.lost
    lock.release()
    assert not (tmp_path / ".lock").exists()


def test_a_rank_that_does_not_see_rank_0s_lock_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "SHARED_WAIT_S", 0.3)
    lock = RunLock(tmp_path / "shared", job="a")
    token = lock.acquire()
    check_shared(tmp_path / "shared", token)  # the same directory: seen
    with pytest.raises(UserError, match="must be on a file system every node shares, not on a node-local disk"):
        check_shared(tmp_path / "node-local", token)  # the same path on another node's own disk
    lock.release()


def test_a_failed_start_removes_the_directories_its_lock_made(tmp_path):
    lock = RunLock(tmp_path / "runs" / "digits" / "abc", job=None)
    lock.acquire()
    lock.release(keep_dirs=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where, message", [("file", "is a file"), ("under_file", "is under")])
def test_a_run_dir_that_cannot_be_a_directory_is_refused_in_one_line(tmp_path, where, message):
    (tmp_path / "file").write_text("")
    run_dir = tmp_path / "file" if where == "file" else tmp_path / "file" / "run"
    with pytest.raises(UserError, match=message):
        RunLock(run_dir, job=None).acquire()


def config(*overrides):
    recipe = load_recipe("digits")
    cfg = build_config(recipe.defaults, {}, parse_overrides(overrides), "digits")
    cfg.recipe = "digits"
    return recipe, cfg


def test_the_derived_run_name_follows_what_defines_the_run():
    recipe, base = config()
    name = derived_name(base, recipe)
    assert derived_name(config("train.epochs=40", "dist.nproc_per_node=2", "ckpt.keep=9", "wandb.mode=disabled",
                               "data.num_workers=2", "eval.sharded=true")[1], recipe) == name
    for changed in ("optim.lr=0.01", "train.seed=1", "model.channels=16", "train.batch_size=32"):
        assert derived_name(config(changed)[1], recipe) != name, changed


def test_config_changes_are_sorted_into_free_applied_and_refused():
    _, saved = config("train.epochs=3")
    mid_epoch = {"samples_in_epoch": 64}
    _, now = config("train.epochs=5", "optim.lr=0.01", "log.level=warning")
    changes = config_changes(OmegaConf.to_container(saved), now)
    assert changes == {"train.epochs": (3, 5), "optim.lr": (0.05, 0.01), "log.level": ("info", "warning")}
    _refuse_changes(changes, mid_epoch, "x")  # nothing refused
    _, bigger = config("model.channels=16", "train.batch_size=32")
    changes = config_changes(OmegaConf.to_container(saved), bigger)
    with pytest.raises(UserError, match=r"model\.channels 32 -> 16, train\.batch_size 64 -> 32 \(mid-epoch"):
        _refuse_changes(changes, mid_epoch, "x")
    _refuse_changes({"train.batch_size": (64, 32)}, {"samples_in_epoch": 0}, "x")  # at an epoch boundary: fine
    unknown_to_old = OmegaConf.to_container(saved)
    del unknown_to_old["run"]["name"]  # a key the engine added since: its default is no change
    assert "run.name" not in config_changes(unknown_to_old, saved)


def test_every_single_bit_flip_inside_a_checkpoint_record_is_detected(tmp_path):
    path = tmp_path / "step.pt"
    save_atomic({"model": {"w": torch.randn(1000)}, "global_step": 3}, path)
    assert load_checkpoint(path)["global_step"] == 3
    with zipfile.ZipFile(path) as archive:
        records = [info for info in archive.infolist() if info.file_size]
    original = path.read_bytes()
    rng = random.Random(0)
    for record in rng.sample(records, k=min(3, len(records))) + rng.choices(records, k=3):
        raw = bytearray(original)
        name_and_extra = int.from_bytes(raw[record.header_offset + 26:record.header_offset + 28], "little") + \
            int.from_bytes(raw[record.header_offset + 28:record.header_offset + 30], "little")
        start = record.header_offset + 30 + name_and_extra
        raw[start + rng.randrange(record.file_size)] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(raw))
        with pytest.raises(BadCheckpoint):
            load_checkpoint(path)
    path.write_bytes(original[: len(original) // 2])
    with pytest.raises(BadCheckpoint):
        load_checkpoint(path)
