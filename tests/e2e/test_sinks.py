"""log.to's sinks besides wandb, in real runs, read back with each library's own reader: TensorBoard's
EventAccumulator and MLflow's client; a library that cannot be imported; a sink that fails while training goes on."""

import json
import os
import textwrap
from pathlib import Path

import pytest
import yaml
from helpers import (
    RECIPE,
    assert_user_error,
    check_ok,
    history,
    launch,
    launcher_lines,
    offline_runs,
    read_metrics,
    run_id,
    wandb_records,
    without_credentials,
)
from mlflow import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from launcher.config.keys import leaves

# The test recipe (digits, INTERRUPT), with samples after each evaluation: the text records.
SAMPLING = RECIPE + textwrap.dedent("""
    def samples(model, eval_set, cfg):
        return ["a first line", "and a <second>"]
""")
ALL = ["recipe=sampling.py", "run.dir=run", "log.to=[wandb,tensorboard,mlflow]"]


@pytest.fixture(autouse=True)
def local_mlflow(monkeypatch):
    """No MLflow server of this machine's: each run uses its own run.dir/mlruns, which this process reads too."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads its file store only when asked to


def scalar_steps(events: EventAccumulator, tag: str) -> list[int]:
    return [event.step for event in events.Scalars(tag)]


def steps_of(records: list[dict], key: str) -> list[int]:
    return [record["step"] for record in records if key in record]


def test_every_sink_gets_every_record_and_continues_its_run_after_a_stop(tmp_path):
    (tmp_path / "sampling.py").write_text(SAMPLING)
    stopped = launch(ALL, tmp_path, env={**without_credentials(tmp_path), "INTERRUPT": "0:30:SIGTERM"})
    assert stopped.returncode == 75, stopped.stdout + stopped.stderr
    check_ok(launch(ALL, tmp_path, env=without_credentials(tmp_path)))
    run = tmp_path / "run"
    records = read_metrics(run)
    resumed_at = json.loads((run / "history.jsonl").read_text().splitlines()[-2])["resumed_from"]["step"]
    assert 22 < resumed_at < 44 and steps_of(records, "train/loss") == sorted(set(steps_of(records, "train/loss")))

    # TensorBoard: one folder, an event file per attempt; every scalar at its step, once, as metrics.jsonl has it.
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    for key in ("train/loss", "eval/accuracy", "lr/group0", "throughput/samples_per_s"):
        assert scalar_steps(events, key) == steps_of(records, key), key
    assert scalar_steps(events, "eval/accuracy") == [22, 44, 66]
    assert [event.value for event in events.Scalars("eval/loss")] == pytest.approx(
        [record["eval/loss"] for record in records if "eval/loss" in record], rel=1e-6)
    assert [event.step for event in events.Tensors("eval/samples/text_summary")] == [22, 44, 66]
    assert {"config/text_summary", "model/summary/text_summary", "model/path/text_summary"} <= set(
        events.Tags()["tensors"])

    # MLflow: one run, continued; params the config, every metric at its step once, the texts and model.pt.
    client = MlflowClient((run / "mlruns").resolve().as_uri())
    kept = json.loads((run / "mlflow_run.json").read_text())
    (experiment,) = [found for found in client.search_experiments() if found.name == "launcher"]
    (mlflow_run,) = client.search_runs([experiment.experiment_id])
    assert mlflow_run.info.run_id == kept["run_id"] and mlflow_run.info.status == "FINISHED"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert mlflow_run.data.params == {key: str(value) for key, value in leaves(config)}
    for key in ("train/loss", "eval/accuracy", "epoch"):
        points = client.get_metric_history(kept["run_id"], key)
        assert [point.step for point in points] == steps_of(records, key), key
    assert [point.value for point in client.get_metric_history(kept["run_id"], "eval/accuracy")] == pytest.approx(
        [record["eval/accuracy"] for record in records if "eval/accuracy" in record])
    assert mlflow_run.data.tags["model_path"] == str((run / "model.pt").resolve())
    assert mlflow_run.data.tags["parameters"] == "4810"
    artifacts = Path(client.download_artifacts(kept["run_id"], "", str(tmp_path / "artifacts")))
    assert (artifacts / "model.pt").read_bytes() == (run / "model.pt").read_bytes()
    assert "Total params: 4,810" in (artifacts / "summary.txt").read_text()
    assert sorted(path.name for path in (artifacts / "eval" / "samples").iterdir()) == [
        "step_22.txt", "step_44.txt", "step_66.txt"]
    assert (artifacts / "eval" / "samples" / "step_66.txt").read_text() == "a first line\nand a <second>"

    # wandb: as before, one run continued; the text records as HTML.
    offline = offline_runs(run)
    first, second = (wandb_records(attempt) for attempt in offline)
    assert run_id(first) == run_id(second)
    rows = [row for row in history(first) + history(second) if "eval/samples.path" in row]
    assert [row["_step"] for row in rows] == [22, 44, 66]
    page = (offline[-1] / "files" / rows[-1]["eval/samples.path"]).read_text()
    assert "<pre>a first line\nand a &lt;second&gt;</pre>" in page


def test_a_sink_whose_library_cannot_be_imported_is_one_line_before_training(tmp_path):
    shim = tmp_path / "shim"  # installed, but broken: found on the path, and its import fails
    for name in ("tensorboard", "mlflow"):
        (shim / name).mkdir(parents=True)
        (shim / name / "__init__.py").write_text(f"raise ImportError('{name} is broken here')\n")
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(shim), os.environ.get("PYTHONPATH")]))}
    common = ["recipe=digits", "wandb.mode=disabled"]
    result = launch([*common, "run.dir=one", "log.to=[tensorboard]"], tmp_path, env=env)
    assert_user_error(result, "log.to names tensorboard, but its library tensorboard cannot be used (ImportError: "
                              "tensorboard is broken here): pip install tensorboard, or leave tensorboard out of "
                              "log.to")
    result = launch([*common, "run.dir=two", "log.to=[wandb,mlflow]", "dist.nproc_per_node=2"], tmp_path, env=env)
    assert_user_error(result, "log.to names mlflow, but its library mlflow cannot be used (ImportError: mlflow is "
                              "broken here): pip install mlflow-skinny")
    assert not (tmp_path / "one").exists() and not (tmp_path / "two").exists()  # no trace, no wandb run
    unknown = launch([*common, "log.to=[tensorboard,neptune]", "--cfg"], tmp_path)
    assert_user_error(unknown, "log.to=['tensorboard', 'neptune'] must be a list of: wandb, tensorboard, mlflow")


def test_a_sink_that_fails_warns_once_and_training_goes_on_on_rank_0_alone(tmp_path):
    # An MLflow server nothing answers at; TensorBoard works. Two processes: rank 0 alone writes.
    env = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    result = check_ok(launch(["recipe=digits", "run.dir=run", "train.epochs=2", "log.to=[mlflow,tensorboard]",
                              "wandb.mode=disabled", "dist.nproc_per_node=2"], tmp_path, env=env))
    warnings = [line for line in launcher_lines(result) + result.stdout.splitlines() if "log.to:" in line]
    assert len(warnings) == 1 and warnings[0].startswith("log.to: mlflow failed (MlflowException: "), warnings
    assert "training goes on without it (metrics.jsonl has every record)" in warnings[0]
    assert [record["epoch"] for record in read_metrics(tmp_path / "run") if "eval/accuracy" in record] == [1, 2]
    (events_file,) = (tmp_path / "run" / "tensorboard").iterdir()  # rank 0's only
    events = EventAccumulator(str(events_file))
    events.Reload()
    assert scalar_steps(events, "eval/accuracy") == [22, 44]
    assert not (tmp_path / "run" / "mlflow_run.json").exists()
