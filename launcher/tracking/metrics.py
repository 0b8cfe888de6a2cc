"""Metrics: one JSON object per line in <run.dir>/metrics.jsonl, passed on to wandb as they are written."""

from __future__ import annotations

import json
from pathlib import Path


def read_records(path: Path) -> list[dict]:
    """The records of a metrics.jsonl file (none if it does not exist): the one reader of the format."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Records:
    """Rank 0's records of a run: appended to ``metrics.jsonl``, and logged to the wandb run when there is one."""

    def __init__(self, path: Path, wandb_run=None):
        self.path, self.wandb_run = path, wandb_run

    def last_step(self) -> int:
        """The step of the newest record (0 for none): what an earlier attempt of this run logged through."""
        return max((record["step"] for record in read_records(self.path)), default=0)

    def drop_after(self, step: int) -> None:
        """Forget records past ``step``: after a resume from ``step`` they are written again."""
        kept = [record for record in read_records(self.path) if record["step"] <= step]
        self.path.write_text("".join(json.dumps(record) + "\n" for record in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as file:
            file.write(json.dumps(record) + "\n")
        if self.wandb_run:
            self.wandb_run.log(record)
