"""Where rank 0's records go besides metrics.jsonl: one class per place, each named in ``log.to``.

Every sink gets the same few calls: the start (or continuation) of its run with the config, the model summary, every
metric at its step, the text records (a recipe's samples), model.pt's path, and the end. metrics.jsonl is a sink too
(``launcher.tracking.metrics``), always on; ``Records`` there hands each record to all of them and drops a sink that
raises, after one warning. A new place is one class here, its entry in ``SINKS``, and its name (with its library) in
config/keys.py's ``SINK_LIBRARIES``.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import threading
import time
from pathlib import Path

from omegaconf import OmegaConf

from launcher.config.keys import leaves
from launcher.errors import described
from launcher.storage import write_atomic
from launcher.tracking.wandb import WandbRun, begin_wandb, wandb_mode

log = logging.getLogger(__name__)

CLOSE_WAIT_S = 10.0  # how long the end of a run waits for a sink on its own thread (MLflow) to send what is queued


class Sink:
    """One place for a run's records, on rank 0.

    Made as the attempt opens (its library imported then: a broken one fails the start), started once the start has
    passed every check, closed as the attempt ends (also when it never started). A sink with no place for one kind of
    record leaves it: these methods do nothing.
    """

    name = ""  # as log.to names it
    on_own_thread = False  # its calls may wait on a network: made on a thread of their own (``OnThread``)

    def __init__(self, cfg, run_dir: Path, job_group: str | None):
        self.cfg, self.run_dir, self.job_group = cfg, run_dir, job_group

    @classmethod
    def wanted(cls, cfg) -> bool:
        """Whether the config, besides naming it in log.to, asks for it (wandb.mode=disabled does not)."""
        return True

    def start(self, step: int, logged_through: int) -> None:
        """Start the run, or continue it: this attempt resumes from ``step``.

        An earlier attempt logged through ``logged_through``: the steps past ``step`` up to it come again.
        """

    def summary(self, text: str, parameters: int, trainable: int) -> None:
        """The model summary (torchsummary's table, or the parameter table) and the parameter counts."""

    def metrics(self, step: int, values: dict) -> None:
        """One record's values (numbers, ``epoch`` among them) at ``step``."""

    def text(self, step: int, key: str, text: str) -> None:
        """A text record at ``step``: a recipe's samples after an evaluation."""

    def model(self, path: Path) -> None:
        """model.pt is written at ``path``."""

    def close(self, outcome: str, discard: bool = False) -> None:
        """The attempt ended: finished, stopped or failed.

        ``discard``: the run is taken away (a new run that failed before its first checkpoint), and what the sink
        keeps of it with it.
        """


def dropped(name: str, error: BaseException) -> None:
    """The one warning for a sink that failed: it is dropped, and training goes on."""
    log.warning("log.to: %s failed (%s); training goes on without it (metrics.jsonl has every record)", name,
                described(error))


def number(value) -> float | None:
    """A metric as a float (a recipe's tensor or NumPy scalar too); None for what is no number."""
    value = value.item() if hasattr(value, "item") else value
    return float(value) if isinstance(value, (int, float)) else None


def _preformatted(text: str) -> str:
    """Text as a Markdown code block (TensorBoard renders its text as Markdown): tables keep their columns."""
    return "\n".join("    " + line for line in text.splitlines())


class Wandb(Sink):
    """The job's wandb run, in its own process (``launcher.tracking.wandb``): started as the attempt opens."""

    name = "wandb"

    def __init__(self, cfg, run_dir: Path, job_group: str | None):
        super().__init__(cfg, run_dir, job_group)
        self.run = WandbRun()  # wandb takes about a second to import: in its process, while the model is built

    @classmethod
    def wanted(cls, cfg) -> bool:
        return wandb_mode(cfg) != "disabled"

    def start(self, step: int, logged_through: int) -> None:
        begin_wandb(self.run, self.cfg, self.run_dir, self.job_group, logged_through)

    def summary(self, text: str, parameters: int, trainable: int) -> None:
        self.run.save_summary(parameters, trainable, text)

    def metrics(self, step: int, values: dict) -> None:
        self.run.log({"step": step, **values})

    def text(self, step: int, key: str, text: str) -> None:
        self.run.text(step, key, text)

    def model(self, path: Path) -> None:
        self.run.save_model_path(path)

    def close(self, outcome: str, discard: bool = False) -> None:
        self.run.finish(wait=discard)  # a discarded run's files go too: after wandb wrote them
        if discard:
            shutil.rmtree(self.run_dir / "wandb", ignore_errors=True)


class TensorBoard(Sink):
    """torch's ``SummaryWriter`` into run.dir/tensorboard: scalars at their steps; config, summary and texts as text.

    A resumed run writes into the same folder. Its new event file starts at the resume step + 1 (``purge_step``), so
    TensorBoard drops what an earlier attempt wrote past the resume step instead of showing those steps twice.
    """

    name = "tensorboard"
    FOLDER = "tensorboard"

    def __init__(self, cfg, run_dir: Path, job_group: str | None):
        super().__init__(cfg, run_dir, job_group)
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: a broken one fails the start here

        self._writer_class, self.writer, self.step = SummaryWriter, None, 0

    def start(self, step: int, logged_through: int) -> None:
        folder = self.run_dir / self.FOLDER
        self.writer = self._writer_class(str(folder), purge_step=step + 1 if folder.exists() else None)
        self.step = step
        self.writer.add_text("config", _preformatted(OmegaConf.to_yaml(self.cfg)), step)

    def summary(self, text: str, parameters: int, trainable: int) -> None:
        self.writer.add_text("model/summary", f"{parameters:,} parameters, {trainable:,} trainable\n\n"
                             + _preformatted(text), self.step)

    def metrics(self, step: int, values: dict) -> None:
        for key, value in values.items():
            if (scalar := number(value)) is not None:
                self.writer.add_scalar(key, scalar, step)
        self.writer.flush()  # on disk as metrics.jsonl's record is: a killed attempt loses neither
        self.step = step

    def text(self, step: int, key: str, text: str) -> None:
        self.writer.add_text(key, _preformatted(text), step)

    def model(self, path: Path) -> None:
        self.writer.add_text("model/path", str(path.resolve()), self.step)

    def close(self, outcome: str, discard: bool = False) -> None:
        if self.writer is not None:
            self.writer.close()
        if discard:
            shutil.rmtree(self.run_dir / self.FOLDER, ignore_errors=True)


class MLflow(Sink):
    """An MLflow run on ``MLFLOW_TRACKING_URI``'s server or store, else in run.dir/mlruns (a local file store).

    Its params are the flattened config (MLflow keeps a param's first value: a key changed on resume keeps it there, and
    config.yaml, an artifact, is the config in force); metrics at their steps; the summary, config.yaml and the texts
    as text artifacts; model.pt as an artifact, and its path as the tag ``model_path``. The run's id is kept in
    run.dir/mlflow_run.json, so a resumed run continues it. The experiment is ``MLFLOW_EXPERIMENT_ID`` or
    ``MLFLOW_EXPERIMENT_NAME``, else ``launcher``.
    """

    name = "mlflow"
    on_own_thread = True  # a tracking server may be slow, or retry for minutes: never a step's wait
    ID_FILE = "mlflow_run.json"
    LOCAL_STORE = "mlruns"
    EXPERIMENT = "launcher"
    STATUS = {"finished": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}

    def __init__(self, cfg, run_dir: Path, job_group: str | None):
        super().__init__(cfg, run_dir, job_group)
        from mlflow import MlflowClient  # a broken MLflow fails the start here

        self._client_class, self.client, self.run_id, self.logged_through = MlflowClient, None, None, 0
        self.model_path: Path | None = None
        self.uri = os.environ.get("MLFLOW_TRACKING_URI", "")  # '': the run's own local store
        # MLflow 3 refuses its file store (mlruns/) without this. Set here, on the main thread: setenv beside a
        # getenv on another thread is not safe.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")

    def start(self, step: int, logged_through: int) -> None:
        from mlflow.entities import Param

        self.client = self._client_class(self.uri or (self.run_dir / self.LOCAL_STORE).resolve().as_uri())
        self.run_id, logged = self._kept_run(), {}
        if self.run_id:
            self.client.update_run(self.run_id, status="RUNNING")
            logged = self.client.get_run(self.run_id).data.params
        else:
            self.run_id, logged_through = self._new_run(), 0  # a new MLflow run has none of the earlier steps
        config = OmegaConf.to_container(self.cfg)
        params = [Param(key, str(value)) for key, value in leaves(config) if key not in logged]
        self.client.log_batch(self.run_id, params=params)
        self.client.log_text(self.run_id, OmegaConf.to_yaml(self.cfg), "config.yaml")
        self.logged_through = logged_through

    def _kept_run(self) -> str | None:
        """The id of the run an earlier attempt started, when it was on this tracking URI."""
        path = self.run_dir / self.ID_FILE
        if not path.is_file():
            return None
        kept = json.loads(path.read_text())
        if kept["tracking_uri"] != self.uri:
            log.info("mlflow: MLFLOW_TRACKING_URI is now %r, not %r where run %s is: a new MLflow run",
                     self.uri, kept["tracking_uri"], kept["run_id"])
            return None
        try:
            self.client.get_run(kept["run_id"])
        except Exception:  # not there: run.dir restored from ckpt.remote without mlruns/, or a server that lost it
            log.info("mlflow: run %s is not in %s: a new MLflow run", kept["run_id"], self.uri or self.LOCAL_STORE)
            return None
        return kept["run_id"]

    def _new_run(self) -> str:
        tags = {"run_dir": str(self.run_dir.resolve()), **({"job_group": self.job_group} if self.job_group else {})}
        name = f"{self.run_dir.resolve().parent.name}-{self.run_dir.name}"  # <recipe>-<run name>, as wandb's
        run = self.client.create_run(self._experiment(), run_name=name, tags=tags)
        kept = {"run_id": run.info.run_id, "tracking_uri": self.uri}
        write_atomic(self.run_dir / self.ID_FILE, lambda file: file.write((json.dumps(kept) + "\n").encode()))
        return run.info.run_id

    def _experiment(self) -> str:
        """The experiment's id, made if it is new."""
        if os.environ.get("MLFLOW_EXPERIMENT_ID"):
            return os.environ["MLFLOW_EXPERIMENT_ID"]
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or self.EXPERIMENT
        found = self.client.get_experiment_by_name(name)
        if found:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # made meanwhile by another run (a sweep's tasks start together)
            return self.client.get_experiment_by_name(name).experiment_id

    def summary(self, text: str, parameters: int, trainable: int) -> None:
        from mlflow.entities import RunTag

        self.client.log_text(self.run_id, text, "summary.txt")
        self.client.log_batch(self.run_id, tags=[RunTag("parameters", str(parameters)),
                                                 RunTag("parameters_trainable", str(trainable))])

    def metrics(self, step: int, values: dict) -> None:
        if step <= self.logged_through:  # an earlier attempt logged it: MLflow would hold the step twice
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        points = [Metric(key, scalar, now, step) for key, value in values.items()
                  if (scalar := number(value)) is not None]
        self.client.log_batch(self.run_id, metrics=points)

    def text(self, step: int, key: str, text: str) -> None:
        if step > self.logged_through:
            self.client.log_text(self.run_id, text, f"{key}/step_{step}.txt")

    def model(self, path: Path) -> None:
        self.client.set_tag(self.run_id, "model_path", str(path.resolve()))
        self.model_path = path  # uploaded as the run ends, after its status: a long upload never leaves it RUNNING

    def close(self, outcome: str, discard: bool = False) -> None:
        if self.run_id is None:
            return
        self.client.set_terminated(self.run_id, self.STATUS[outcome])
        if self.model_path is not None and not discard:
            self.client.log_artifact(self.run_id, str(self.model_path))
        if discard and self.uri:
            self.client.delete_run(self.run_id)
        elif discard:
            shutil.rmtree(self.run_dir / self.LOCAL_STORE, ignore_errors=True)


class OnThread(Sink):
    """A sink whose calls may wait on a network (a tracking server), made in order on a thread of its own.

    Rank 0 only queues them, so a slow or unreachable server never holds a step. The first call that raises drops the
    sink (one warning); the end of the run waits for what is still queued at most ``CLOSE_WAIT_S``.
    """

    def __init__(self, sink: Sink):
        self.sink, self.name = sink, sink.name
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name=f"launcher-{sink.name}", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        failed = False
        while (call := self._calls.get()) is not None:
            method, args = call
            if failed and method != "close":  # closed all the same: its files, a discarded run's folder
                continue
            try:
                getattr(self.sink, method)(*args)
            except Exception as error:
                if not failed:
                    dropped(self.name, error)
                failed = True

    def start(self, step: int, logged_through: int) -> None:
        self._calls.put(("start", (step, logged_through)))

    def summary(self, text: str, parameters: int, trainable: int) -> None:
        self._calls.put(("summary", (text, parameters, trainable)))

    def metrics(self, step: int, values: dict) -> None:
        self._calls.put(("metrics", (step, values)))

    def text(self, step: int, key: str, text: str) -> None:
        self._calls.put(("text", (step, key, text)))

    def model(self, path: Path) -> None:
        self._calls.put(("model", (path,)))

    def close(self, outcome: str, discard: bool = False) -> None:
        self._calls.put(("close", (outcome, discard)))
        self._calls.put(None)
        self._thread.join(CLOSE_WAIT_S)
        if self._thread.is_alive():
            log.warning("log.to: %s has not sent everything within %.0f s; the rest is left (metrics.jsonl has every "
                        "record)", self.name, CLOSE_WAIT_S)


SINKS: dict[str, type[Sink]] = {"wandb": Wandb, "tensorboard": TensorBoard, "mlflow": MLflow}


def open_sinks(cfg, run_dir: Path, job_group: str | None) -> list[Sink]:
    """Rank 0, as the attempt opens: ``log.to``'s sinks, in order, each library imported.

    One that cannot be imported (a broken install that the check before any process started could not see) is a
    ``UserError``.
    """
    from launcher.config.build import sink_library_missing  # here: launcher.plot reads metrics.jsonl without torch

    sinks: list[Sink] = []
    for name in dict.fromkeys(cfg.log.to):  # each once
        if not SINKS[name].wanted(cfg):
            continue
        try:
            sink = SINKS[name](cfg, run_dir, job_group)
        except Exception as error:
            for made in sinks:
                made.close("failed")
            raise sink_library_missing(name, described(error)) from None
        sinks.append(OnThread(sink) if sink.on_own_thread else sink)
    return sinks
