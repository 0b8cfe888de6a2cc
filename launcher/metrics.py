"""Metrics: one JSON object per line in <run.dir>/metrics.jsonl, and the human-readable epoch line."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsFile:
    """Appends metric records to ``metrics.jsonl`` and passes them on to wandb when it runs; rank 0 owns it."""

    def __init__(self, path: Path):
        self.path = path
        self.wandb = None  # a launcher.tracking.WandbRun, once started

    def _records(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines()] if self.path.exists() else []

    def last_step(self) -> int:
        """The step of the newest record (0 for none): what an earlier attempt of this run logged through."""
        return max((record["step"] for record in self._records()), default=0)

    def drop_after(self, step: int) -> None:
        """Forget records past ``step``: after a resume from ``step`` they are written again."""
        kept = [record for record in self._records() if record["step"] <= step]
        self.path.write_text("".join(json.dumps(record) + "\n" for record in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as file:
            file.write(json.dumps(record) + "\n")
        if self.wandb:
            self.wandb.log(record)


def format_epoch(record: dict, epochs: int) -> str:
    """The per-epoch line: train loss, eval loss and accuracy, seconds per epoch, samples per second."""
    parts = [f"epoch {record['epoch']}/{epochs}", f"train loss {record['train/loss']:.4f}"]
    if "eval/loss" in record:
        parts.append(f"eval loss {record['eval/loss']:.4f}")
    if "eval/accuracy" in record:
        parts.append(f"eval accuracy {record['eval/accuracy']:.4f}")
    parts.append(f"{record['time/epoch_s']:.2f} s/epoch")
    parts.append(f"{record['throughput/samples_per_s']:,.0f} samples/s")
    return " | ".join(parts)
