"""The records and their sinks, in this process: the hand-out to every sink and the drop of one that fails,
metrics.jsonl's resume, TensorBoard's and MLflow's continued runs read back with their own readers, log.to's
validation, and the wandb process's text records."""

import json
import logging
import shutil
import threading
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from launcher.config import build
from launcher.config.build import build_config, validate
from launcher.config.keys import SINK_LIBRARIES
from launcher.errors import UserError
from launcher.tracking import sinks
from launcher.tracking.metrics import Records, read_records
from launcher.tracking.sinks import MLflow, OnThread, Sink, TensorBoard, open_sinks
from launcher.tracking.wandb_process import apply


@pytest.fixture(autouse=True)
def mlflow_here(monkeypatch):
    """The launcher's warnings reach caplog; MLflow's local file store is allowed (the sink asks as much)."""
    monkeypatch.setattr(logging.getLogger("launcher"), "propagate", True)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(name, raising=False)


def config(*overrides: str):
    cfg = build_config({}, {}, build.parse_overrides(["recipe=digits", *overrides]), "no recipe")
    validate(cfg, 1, 1)
    return build.freeze(cfg)


class Kept(Sink):
    """What it was handed, in order; it raises on the ``fails``-th call."""

    def __init__(self, name: str, fails: int = 0):
        self.name, self.calls, self.fails = name, [], fails

    def _got(self, *call):
        self.calls.append(call)
        if len(self.calls) == self.fails:
            raise OSError(f"{self.name} broke\nsecond line")

    def start(self, step, logged_through):
        self._got("start", step, logged_through)

    def metrics(self, step, values):
        self._got("metrics", step, values)

    def text(self, step, key, text):
        self._got("text", step, key, text)

    def close(self, outcome, discard=False):
        self._got("close", outcome, discard)


def test_every_sink_gets_every_record_and_one_that_raises_is_dropped_with_one_warning(tmp_path, caplog):
    healthy, failing = Kept("healthy"), Kept("failing", fails=2)
    records = Records(tmp_path / "metrics.jsonl", [failing, healthy])
    records.start(0)
    for step in (10, 20):
        records.write({"step": step, "epoch": 1, "train/loss": 1.0 / step})
    records.write_text(20, "eval/samples", "one\ntwo")
    records.close("finished")
    assert healthy.calls == [("start", 0, 0), ("metrics", 10, {"epoch": 1, "train/loss": 0.1}),
                             ("metrics", 20, {"epoch": 1, "train/loss": 0.05}),
                             ("text", 20, "eval/samples", "one\ntwo"), ("close", "finished", False)]
    assert failing.calls[2:] == [("close", "finished", False)]  # nothing more after it raised but its close
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert warnings == ["log.to: failing failed (OSError: failing broke); training goes on without it (metrics.jsonl "
                        "has every record)"]
    # metrics.jsonl: numbers only (the text records stay out), in the format its one reader reads.
    assert read_records(tmp_path / "metrics.jsonl") == [{"step": 10, "epoch": 1, "train/loss": 0.1},
                                                        {"step": 20, "epoch": 1, "train/loss": 0.05}]


def test_metrics_jsonl_drops_what_follows_the_resume_step_and_the_sinks_learn_what_was_logged(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": step, "train/loss": 1.0}) + "\n" for step in (10, 20, 30)))
    later = Kept("later")
    Records(path, [later]).start(25)
    assert [record["step"] for record in read_records(path)] == [10, 20]
    assert later.calls == [("start", 25, 30)]


def test_metrics_jsonl_that_cannot_be_written_fails_the_run_as_the_ledger_does(tmp_path):
    (tmp_path / "metrics.jsonl").mkdir()
    with pytest.raises(IsADirectoryError):
        Records(tmp_path / "metrics.jsonl").start(0)


def test_a_sink_on_its_own_thread_is_dropped_once_and_never_holds_the_caller(caplog):
    release = threading.Event()

    class Slow(Kept):
        def start(self, step, logged_through):
            release.wait(5)  # a server that answers late
            super().start(step, logged_through)

    slow = Slow("slow", fails=2)
    queued = OnThread(slow)
    queued.start(0, 0)
    queued.metrics(10, {"train/loss": 1.0})  # queued: the caller goes on at once
    queued.metrics(20, {"train/loss": 1.0})
    assert slow.calls == []
    release.set()
    queued.close("finished")
    # Nothing more after it raised but its close (its files; a discarded run's folder).
    assert slow.calls == [("start", 0, 0), ("metrics", 10, {"train/loss": 1.0}), ("close", "finished", False)]
    assert [record.getMessage() for record in caplog.records] == [
        "log.to: slow failed (OSError: slow broke); training goes on without it (metrics.jsonl has every record)"]


def test_tensorboard_continues_its_folder_and_shows_each_step_once(tmp_path):
    cfg = config("log.to=[tensorboard]", "wandb.mode=disabled")
    first = TensorBoard(cfg, tmp_path, None)
    first.start(0, 0)
    for step in (10, 20, 30):  # the checkpoint at 25 is the last: 30 is written again after the resume
        first.metrics(step, {"train/loss": float(step)})
    first.text(20, "eval/samples", "a\nb")
    first.close("failed")
    second = TensorBoard(cfg, tmp_path, None)
    second.start(25, 30)
    second.summary("the table", 7, 5)  # as the run starts: at its step
    for step in (30, 40):
        second.metrics(step, {"train/loss": step + 0.5})
    second.close("finished")
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(event.step, event.value) for event in events.Scalars("train/loss")] == [
        (10, 10.0), (20, 20.0), (30, 30.5), (40, 40.5)]
    assert [event.step for event in events.Tensors("eval/samples/text_summary")] == [20]
    assert [event.step for event in events.Tensors("model/summary/text_summary")] == [25]


def test_mlflow_continues_its_run_with_the_config_as_params_and_never_a_step_twice(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "sinks-test")
    cfg = config("log.to=[mlflow]", "wandb.mode=disabled", "train.epochs=3")
    first = MLflow(cfg, tmp_path, "sweep-7")
    first.start(0, 0)
    for step in (10, 20, 30):
        first.metrics(step, {"train/loss": float(step), "epoch": 1})
    first.close("stopped")
    second = MLflow(config("log.to=[mlflow]", "wandb.mode=disabled", "train.epochs=5"), tmp_path, "sweep-7")
    second.start(25, 30)  # resumed from 25; an earlier attempt logged through 30
    for step in (30, 40):
        second.metrics(step, {"train/loss": step + 0.5, "epoch": 2})
    second.text(40, "eval/samples", "generated")
    (tmp_path / "model.pt").write_bytes(b"weights")
    second.model(tmp_path / "model.pt")
    second.close("finished")
    client = second.client
    run = client.get_run(second.run_id)
    assert second.run_id == first.run_id == json.loads((tmp_path / "mlflow_run.json").read_text())["run_id"]
    assert run.info.status == "FINISHED" and run.info.experiment_id == client.get_experiment_by_name(
        "sinks-test").experiment_id
    assert [(point.step, point.value) for point in client.get_metric_history(run.info.run_id, "train/loss")] == [
        (10, 10.0), (20, 20.0), (30, 30.0), (40, 40.5)]
    assert run.data.params["train.epochs"] == "3" and run.data.params["log.to"] == "['mlflow']"  # the first values
    assert run.data.tags["job_group"] == "sweep-7"
    assert sorted(item.path for item in client.list_artifacts(run.info.run_id)) == [
        "config.yaml", "eval", "model.pt"]
    in_force = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path / "got"))).read_text()
    assert "epochs: 5" in in_force  # the config of the latest attempt


def test_a_discarded_run_takes_its_sinks_folders_with_it(tmp_path):
    cfg = config("log.to=[tensorboard,mlflow]", "wandb.mode=disabled")
    records = Records(tmp_path / "metrics.jsonl", open_sinks(cfg, tmp_path, None))
    records.start(0)
    records.write({"step": 1, "train/loss": 1.0})
    records.close("failed", discard=True)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["metrics.jsonl", "mlflow_run.json"]  # the ledger's


def test_log_to_takes_the_sinks_names_once_each_and_wandb_mode_disabled_leaves_wandb_out(tmp_path):
    assert set(sinks.SINKS) == set(SINK_LIBRARIES)  # a name in the key table is a class, and the other way round
    opened = open_sinks(config("log.to=[tensorboard,wandb,tensorboard]", "wandb.mode=disabled"), tmp_path, None)
    assert [sink.name for sink in opened] == ["tensorboard"]
    assert open_sinks(config("log.to=[]"), tmp_path, None) == []
    with pytest.raises(UserError, match=r"log.to=\['wandb', 'comet'\] must be a list of: wandb, tensorboard, mlflow"):
        config("log.to=[wandb,comet]")


def test_a_sink_library_that_is_not_installed_fails_the_config_in_one_line(monkeypatch):
    found = build.importlib.util.find_spec
    monkeypatch.setattr(build.importlib.util, "find_spec", lambda name: None if name == "mlflow" else found(name))
    with pytest.raises(UserError) as refused:
        config("log.to=[tensorboard,mlflow]")
    assert str(refused.value) == ("log.to names mlflow, but its library mlflow cannot be used (not installed): pip "
                                  "install mlflow-skinny, or leave mlflow out of log.to")
    config("log.to=[wandb,tensorboard]")  # wandb: the launcher's own dependency, never refused here


def test_the_wandb_process_shows_a_text_record_as_preformatted_html():
    logged = []

    class Run:
        def log(self, values, step):
            logged.append((values, step))

    apply(Run(), {"text": {"eval/samples": "a <b>\nc"}, "step": 44})
    ((values, step),) = logged
    assert step == 44 and type(values["eval/samples"]).__name__ == "Html"
    assert "<pre>a &lt;b&gt;\nc</pre>" in values["eval/samples"].html

def test_an_mlflow_run_the_store_no_longer_has_is_a_new_run_with_every_step(tmp_path, monkeypatch):
    """As after a restore from ckpt.remote into an empty run.dir: mlflow_run.json came back, mlruns/ did not."""
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "sinks-test")
    cfg = config("log.to=[mlflow]", "wandb.mode=disabled")
    first = MLflow(cfg, tmp_path / "first", None)
    first.start(0, 0)
    first.close("stopped")
    (tmp_path / "restored").mkdir()
    shutil.copy(tmp_path / "first" / "mlflow_run.json", tmp_path / "restored")
    second = MLflow(cfg, tmp_path / "restored", None)
    second.start(25, 30)
    for step in (30, 40):
        second.metrics(step, {"train/loss": float(step)})
    second.close("finished")
    assert second.run_id != first.run_id
    history = second.client.get_metric_history(second.run_id, "train/loss")
    assert [point.step for point in history] == [30, 40]  # the new run has none of the earlier steps: 30 again
