"""The run directory: where a run lives, and its ledger.

The directory is named by what defines the run, so the same command finds it again. The ledger is run.json (the run's
identity and first config) and history.jsonl (every attempt, what it changed, how it ended).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import time
from pathlib import Path

from omegaconf import OmegaConf

from launcher.config.keys import DEFAULTS, FREE, leaves, resume_policy
from launcher.recipe import Recipe
from launcher.storage import write_atomic

# What a run's start writes into its directory besides checkpoints and model.pt (the ledger, config.yaml, the records,
# the summary, the wandb and MLflow runs' ids): what a new run that never checkpointed takes away again, and what
# ckpt.remote holds. The sinks' folders (wandb/, tensorboard/, mlruns/) are theirs to take away (tracking/sinks.py).
RECORD_FILES = ("run.json", "history.jsonl", "config.yaml", "metrics.jsonl", "summary.txt", "wandb_id",
                "mlflow_run.json")


def new_run_id() -> str:
    """A fresh id: readable, sortable, and unlikely to collide."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def derived_name(cfg, recipe: Recipe) -> str:
    """A name for the run from what defines it.

    That is the recipe and every key that may not change on resume, where it differs from the engine's default (so a key
    the engine adds later does not rename existing runs).

    Changing ``train.epochs``, logging, checkpointing, evaluation or the process count keeps the name, so the same
    command (with more epochs, or on more GPUs) continues the same run; changing the model, the data, the seed or
    the optimizer names another run.
    """
    values = {key: value for key, value in leaves(OmegaConf.to_container(cfg))
              if key != "recipe" and resume_policy(key) != FREE and (key not in DEFAULTS or value != DEFAULTS[key])}
    values["recipe"] = recipe.origin
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:10]


def run_dir_for(cfg, recipe: Recipe) -> Path:
    """``run.dir`` if set, else runs/<recipe>/<run.name, or the name derived from the config>.

    The same on every rank and every restart without any agreement.
    """
    if cfg.run.dir:
        return Path(cfg.run.dir)
    return Path("runs") / recipe.name / (cfg.run.name or derived_name(cfg, recipe))


def identity_in(record: bytes | dict | None) -> dict | None:
    """The run identity (``run_id``, ``config``) a run.json's bytes, or a checkpoint manifest, holds; else None."""
    try:
        record = json.loads(record) if isinstance(record, bytes) else record
    except ValueError:
        return None
    if isinstance(record, dict) and isinstance(record.get("run_id"), str) and isinstance(record.get("config"), dict):
        return {"run_id": record["run_id"], "config": record["config"]}
    return None


class Ledger:
    """What a run directory says about its run.

    Rank 0 alone writes it, and only once a start has passed every check (a start that fails writes nothing).
    """

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.identity_file, self.history_file = run_dir / "run.json", run_dir / "history.jsonl"

    def holds_run(self) -> bool:
        return self.identity_file.is_file()

    def run_id(self) -> str | None:
        """The id of the run this directory holds; its checkpoints carry it."""
        return json.loads(self.identity_file.read_text())["run_id"] if self.holds_run() else None

    def identity(self) -> dict | None:
        """The run's id and first config (what ckpt.remote tells its run by); None while it holds no run."""
        return identity_in(self.identity_file.read_bytes()) if self.holds_run() else None

    def create(self, run_id: str, cfg, parent: str | None) -> None:
        """Record a new run: its id, where it started from (a checkpoint of another run, or nothing), its config."""
        identity = {"run_id": run_id, "created": time.strftime("%Y-%m-%d %H:%M:%S"), "started_from": parent,
                    "config": OmegaConf.to_container(cfg)}
        write_atomic(self.identity_file, lambda file: file.write((json.dumps(identity, indent=1) + "\n").encode()))

    def attempts(self) -> list[dict]:
        if not self.history_file.exists():
            return []
        return [json.loads(line) for line in self.history_file.read_text().splitlines() if line.strip()]

    def start_attempt(self, cfg, job: str | None, world_size: int, resumed_from: dict | None,
                      changes: dict[str, list], restored: dict | None = None) -> int:
        """Append this attempt's start and write config.yaml; returns the attempt's number.

        The start says where it resumed from, what it changed, and what it ``restored`` from ckpt.remote into an empty
        run directory; config.yaml holds the config in force now.
        """
        attempt = 1 + sum(1 for event in self.attempts() if event["event"] == "start")
        self._append({"event": "start", "attempt": attempt, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                      "host": socket.gethostname(), "job": job, "world_size": world_size,
                      "resumed_from": resumed_from, "changes": changes,
                      **({"restored_from": restored} if restored else {})})
        write_atomic(self.run_dir / "config.yaml", lambda file: file.write(OmegaConf.to_yaml(cfg).encode()))
        return attempt

    def end_attempt(self, attempt: int, outcome: str, step: int, detail: str = "") -> None:
        """How the attempt ended: finished, stopped (a signal; the same command continues) or failed."""
        self._append({"event": "end", "attempt": attempt, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                      "outcome": outcome, "step": step, "detail": detail})

    def _append(self, event: dict) -> None:
        with self.history_file.open("a") as file:
            file.write(json.dumps(event) + "\n")
            file.flush()
            os.fsync(file.fileno())
