"""Metrics: one JSON object per line in <run.dir>/metrics.jsonl, and the records handed to every sink as they come."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from launcher.tracking.sinks import Sink, dropped


def read_records(path: Path) -> list[dict]:
    """The records of a metrics.jsonl file (none if it does not exist): the one reader of the format."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsFile(Sink):
    """``metrics.jsonl``, always written: a record per line, ``{"step": N, ...}``, numbers only.

    Its last step is what an earlier attempt logged through; on resume, the records past the resume step are dropped
    and written again. Text records stay out (the log has them): its readers (``launcher.plot``, the tests) take
    every value for a number and every step once per kind of record.
    """

    name = "metrics.jsonl"

    def __init__(self, path: Path):
        self.path = path

    def last_step(self) -> int:
        """The step of the newest record (0 for none): what an earlier attempt of this run logged through."""
        return max((record["step"] for record in read_records(self.path)), default=0)

    def drop_after(self, step: int) -> None:
        """Forget records past ``step``: after a resume from ``step`` they are written again."""
        kept = [record for record in read_records(self.path) if record["step"] <= step]
        self.path.write_text("".join(json.dumps(record) + "\n" for record in kept))

    def start(self, step: int, logged_through: int) -> None:
        self.drop_after(step)

    def metrics(self, step: int, values: dict) -> None:
        with self.path.open("a") as file:
            file.write(json.dumps({"step": step, **values}) + "\n")


class Records:
    """Rank 0's records of a run, handed to each sink: metrics.jsonl first, then ``log.to``'s.

    A sink that raises is dropped after one warning, and training goes on. Not metrics.jsonl: the run's own record,
    which resumes and ckpt.remote read, fails the run when it cannot be written, as the ledger does.
    """

    def __init__(self, path: Path, sinks: Iterable[Sink] = ()):
        self.file = MetricsFile(path)
        self.sinks: list[Sink] = [self.file, *sinks]
        self.dropped: list[Sink] = []  # closed with the rest as the attempt ends: files, a discarded run's folders

    def start(self, step: int) -> None:
        """Begin this attempt's records at ``step``, where it resumes (0: a new run): each sink starts, or continues."""
        logged_through = self.file.last_step()  # by an earlier attempt: what wandb and MLflow have already
        self._each("start", step, logged_through)

    def write(self, record: dict) -> None:
        """A record, ``{"step": N, ...}``: the values at step N."""
        self._each("metrics", record["step"], {key: value for key, value in record.items() if key != "step"})

    def write_text(self, step: int, key: str, text: str) -> None:
        """A text record at ``step`` (a recipe's samples after an evaluation), for the sinks that show text."""
        self._each("text", step, key, text)

    def save_summary(self, parameters: int, trainable: int, text: str) -> None:
        """The model summary and the parameter counts."""
        self._each("summary", text, parameters, trainable)

    def model_saved(self, path: Path) -> None:
        """model.pt is in place at ``path``."""
        self._each("model", path)

    def close(self, outcome: str, discard: bool = False) -> None:
        """The attempt ended (finished, stopped or failed); ``discard``: the run is taken away, each sink's with it."""
        self._each("close", outcome, discard)
        for sink in self.dropped:
            try:
                sink.close(outcome, discard)
            except Exception:  # it failed once already, and said so
                pass

    def _each(self, method: str, *args) -> None:
        for sink in list(self.sinks):
            if sink is self.file:
                getattr(sink, method)(*args)
                continue
            try:
                getattr(sink, method)(*args)
            except Exception as error:
                self.sinks.remove(sink)
                dropped(sink.name, error)
                if method != "close":
                    self.dropped.append(sink)
