"""wandb on rank 0: one run per job, continued across restarts and requeues, never a reason for training to fail."""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import secrets
import string
import subprocess
import sys
import threading
from pathlib import Path

from omegaconf import OmegaConf

from launcher.config.keys import KEYS

log = logging.getLogger(__name__)

DEFAULT_PROJECT = KEYS["wandb.project"].default
NOTICES_FILE = "wandb-process.log"  # in the run's wandb folder: what the wandb process says once training has gone
FINISH_WAIT_S = 5.0  # how long the end of a run waits for wandb to finish; then it finishes in the background
# WANDB_MODE's values, wandb's old names included.
_WANDB_MODE_ENV = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline",
                   "disabled": "disabled"}


class WandbRun:
    """Rank 0's handle on the job's wandb run, which lives in its own process (``launcher.tracking.wandb_process``).

    Logging a record is one pipe write: wandb's import, start, per-record work and threads stay out of the training
    process. Records at or before ``logged_through`` were logged before a restart; they are skipped, so the
    history never goes back. Any failure (of wandb, or of its process) is one warning; training goes on.
    """

    def __init__(self):
        self.id, self.logged_through, self.notices = None, 0, None
        # The launcher may run from a checkout that is not installed: the process finds it where this one did.
        package_root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        self._process: subprocess.Popen | None = subprocess.Popen(
            [sys.executable, "-m", "launcher.tracking.wandb_process"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True, env=env)
        # Its notices come back here and are logged like rank 0's own lines (around a progress bar, at log.level).
        threading.Thread(target=_relay, args=(self._process.stdout,), name="launcher-wandb-relay", daemon=True).start()

    def begin(self, run_id: str, logged_through: int, start: dict) -> None:
        """Start (or continue: ``run_id``) the run.

        Until this, the process only imports wandb: a start that fails before it creates no wandb run.
        """
        self.id, self.logged_through = run_id, logged_through
        self.notices = Path(start["options"]["dir"]) / "wandb" / NOTICES_FILE
        self._send({"start": start})

    def log(self, record: dict) -> None:
        if record["step"] <= self.logged_through:
            return
        self._send({"log": {key: value for key, value in record.items() if key != "step"}, "step": record["step"]})

    def text(self, step: int, key: str, text: str) -> None:
        """A text record at ``step`` (a recipe's samples), shown as preformatted HTML."""
        if step > self.logged_through:
            self._send({"text": {key: text}, "step": step})

    def save_model_path(self, path: Path) -> None:
        """Where model.pt is, in the run's summary (``model``)."""
        self._send({"summary": {"model": str(path.resolve())}})

    def save_summary(self, parameters: int, trainable: int, summary_text: str | None) -> None:
        """The parameter counts and the torchsummary table, in the run's summary."""
        values = {"parameters": parameters, "parameters_trainable": trainable}
        if summary_text:
            values["model_summary"] = summary_text
        self._send({"summary": values})

    def finish(self, wait: bool = False) -> None:
        """Tell the wandb process to finish the run, without waiting for it.

        Offline, it writes the run out; online, it uploads it. This process waits for it only at its exit, and at most
        ``FINISH_WAIT_S``, so no rank, stop message or error report waits for wandb (a rank still in here when another
        has left is one torchrun ends), and a slow upload goes on in the background instead of holding the end of the
        run. ``wait``: that wait now (before its files are removed).
        """
        self._send({"finish": True})
        if self._process is None:
            return
        with contextlib.suppress(OSError):
            self._process.stdin.close()
        if wait:
            _wait_briefly(self._process, self.notices)
        else:
            atexit.register(_wait_briefly, self._process, self.notices)
        self._process = None

    def _send(self, message: dict) -> None:
        if self._process is None:
            return
        try:
            self._process.stdin.write(json.dumps(message, default=_plain_value) + "\n")
            self._process.stdin.flush()
        except (OSError, ValueError) as error:  # the process is gone: BrokenPipeError, or a closed pipe
            log.warning("the wandb process ended (%s: %s); training goes on, metrics stay in metrics.jsonl",
                        type(error).__name__, error)
            self._process.kill()
            self._process = None


def _relay(lines) -> None:
    """The wandb process's notices ("LEVEL<tab>text" lines), logged in this process."""
    notices = logging.getLogger("launcher.wandb")
    for line in lines:
        level, tab, text = line.rstrip("\n").partition("\t")
        notices.log(logging.getLevelName(level) if tab and level.isupper() else logging.INFO, "%s",
                    text if tab else line.rstrip("\n"))


def _wait_briefly(process: subprocess.Popen, notices: Path | None) -> None:
    try:
        process.wait(timeout=FINISH_WAIT_S)
    except subprocess.TimeoutExpired:
        log.warning("wandb is still finishing its run (pid %d, in the background; its notices go to %s); "
                    "metrics.jsonl has every record", process.pid, notices)


def _plain_value(value):
    """What JSON cannot carry as it is: a tensor or NumPy scalar (a recipe's metric) as its number, else text."""
    return value.item() if hasattr(value, "item") else str(value)


def new_wandb_id() -> str:
    """An id like wandb's own (8 characters of [a-z0-9]), chosen here so it is known before wandb has started."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def wandb_mode(cfg) -> str:
    """``wandb.mode``; under ``auto``, wandb's own WANDB_MODE where it is set."""
    if cfg.wandb.mode != "auto":
        return cfg.wandb.mode
    return _WANDB_MODE_ENV.get(os.environ.get("WANDB_MODE", "").lower(), "auto")


def begin_wandb(wandb_run: WandbRun, cfg, run_dir: Path, job_group: str | None, logged_through: int) -> None:
    """Rank 0: start or continue the job's wandb run.

    Its id is kept in run.dir/wandb_id across restarts. A run that fails to start logs its warning (from its process)
    and logs nothing.

    A key left at its default yields to wandb's own environment variable (WANDB_PROJECT, WANDB_ENTITY, WANDB_NAME,
    WANDB_RUN_GROUP, WANDB_TAGS): wandb reads it where the launcher passes nothing.
    """
    id_file = run_dir / "wandb_id"
    run_id = (id_file.read_text().strip() if id_file.exists() else "") or new_wandb_id()
    from_env = os.environ.__contains__
    options = dict(
        project=None if cfg.wandb.project == DEFAULT_PROJECT and from_env("WANDB_PROJECT") else cfg.wandb.project,
        entity=cfg.wandb.entity or None,
        name=cfg.wandb.name or (None if from_env("WANDB_NAME") else f"{run_dir.parent.name}-{run_dir.name}"),
        group=cfg.wandb.group or (None if from_env("WANDB_RUN_GROUP") else job_group),
        tags=list(cfg.wandb.tags) or None,
        config=OmegaConf.to_container(cfg),
        dir=str(run_dir),
        id=run_id,
        resume="allow",
    )
    id_file.write_text(run_id)
    wandb_run.begin(run_id, logged_through, {"mode": wandb_mode(cfg), "options": options})
