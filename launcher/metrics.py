"""Metrics: one JSON object per line in <run.dir>/metrics.jsonl, and the human-readable epoch line."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsFile:
    """Appends metric records to ``metrics.jsonl``; rank 0 owns it."""

    def __init__(self, path: Path):
        self.path = path

    def drop_after(self, step: int) -> None:
        """Forget records past ``step``: after a resume from ``step`` they are written again."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as file:
            file.write(json.dumps(record) + "\n")


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
