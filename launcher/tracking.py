"""wandb on rank 0: one run per job, continued across restarts and requeues, never a reason for training to fail."""

from __future__ import annotations

import logging
import secrets
import string
import threading
from pathlib import Path

from omegaconf import OmegaConf

log = logging.getLogger(__name__)


def _has_credentials() -> bool:
    """Whether W&B credentials are configured (API key in the environment or from `wandb login`), asked of wandb
    itself without any prompt or network call."""
    import wandb

    try:
        from wandb.sdk.lib.wbauth.authenticate import authenticate_session

        host = wandb.Settings().base_url
        return authenticate_session(host=host, source="launcher", prompt=False, update_session=False) is not None
    except Exception:  # an older or newer wandb without this helper: offline is the safe guess
        return False


class WandbRun:
    """A wandb run that logs records by global step and turns any wandb failure into one warning.

    wandb starts in a background thread (importing it and starting its service take about a second), so training
    does not wait for it: what is logged before it is up waits, in order, and goes out once it is. Records at or
    before ``logged_through`` were logged before a restart; they are skipped, so the history never goes back.
    """

    def __init__(self, run_id: str, logged_through: int, start):
        self.id, self.logged_through, self.run = run_id, logged_through, None
        self._waiting: list = []  # actions on the run, queued until it has started
        self._started: list = []  # what the thread's ``start()`` returned: the run, or None
        self._thread: threading.Thread | None = threading.Thread(
            target=lambda: self._started.append(start()), name="launcher-wandb-start")  # exit waits for it
        self._thread.start()

    def log(self, record: dict) -> None:
        if record["step"] <= self.logged_through:
            return
        values = {key: value for key, value in record.items() if key != "step"}
        self._on_run(lambda run: run.log(values, step=record["step"]))

    def save_summary(self, parameters: int, trainable: int, summary_text: str | None) -> None:
        """The parameter counts and the torchsummary table, in the run's summary."""
        values = {"parameters": parameters, "parameters_trainable": trainable}
        if summary_text:
            values["model_summary"] = summary_text
        self._on_run(lambda run: run.summary.update(values))

    def wait_started(self) -> None:
        """Wait until wandb has started (or failed to), then send what waited for it."""
        self._has_started(wait=True)

    def finish(self) -> None:
        self._has_started(wait=True)
        self._guard(lambda run: run.finish())
        self.run = None

    def _on_run(self, action) -> None:
        if self._has_started():
            self._guard(action)
        else:
            self._waiting.append(action)

    def _has_started(self, wait: bool = False) -> bool:
        """True once the start thread has ended (then the queued actions have run); ``wait``: wait for it."""
        if self._thread is None:
            return True
        if self._thread.is_alive() and not wait:
            return False
        self._thread.join()
        self._thread, self.run = None, (self._started or [None])[0]
        for action in self._waiting:
            self._guard(action)
        self._waiting.clear()
        return True

    def _guard(self, action) -> None:
        if self.run is None:
            return
        try:
            action(self.run)
        except Exception as error:
            log.warning("wandb failed (%s: %s); training goes on, metrics stay in metrics.jsonl",
                        type(error).__name__, error)
            self.run = None


def new_wandb_id() -> str:
    """An id like wandb's own (8 characters of [a-z0-9]), chosen here so it is known before wandb has started."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def start_wandb(cfg, run_dir: Path, job_group: str | None, run_id: str | None, logged_through: int):
    """Rank 0: start or continue (``run_id``) the job's wandb run, in the background; None when wandb is disabled.

    A run that fails to start logs its warning and becomes a run that logs nothing."""
    if cfg.wandb.mode == "disabled":
        return None
    run_id = run_id or new_wandb_id()
    options = dict(
        project=cfg.wandb.project,
        entity=cfg.wandb.entity or None,
        name=cfg.wandb.name or f"{run_dir.parent.name}-{run_dir.name}",
        group=cfg.wandb.group or job_group,
        tags=list(cfg.wandb.tags) or None,
        config=OmegaConf.to_container(cfg),
        dir=str(run_dir),
        id=run_id,
        resume="allow",
    )
    return WandbRun(run_id, logged_through, lambda: _init_run(cfg.wandb.mode, options))


def _init_run(mode: str, options: dict):
    """The wandb run (online falling back to offline), or None after a warning; runs in the start thread."""
    try:
        import wandb

        if mode == "auto":
            mode = "online" if _has_credentials() else "offline"
        # No console capture (the launcher logs itself), no hanging without a network.
        options["settings"] = wandb.Settings(silent=True, console="off", init_timeout=30)
    except Exception as error:
        log.warning("wandb could not start (%s: %s); training goes on without it", type(error).__name__, error)
        return None
    for attempt in (mode, "offline") if mode == "online" else (mode,):
        try:
            run = wandb.init(mode=attempt, **options)
        except Exception as error:
            log.warning("wandb could not start in %s mode (%s: %s)%s", attempt, type(error).__name__,
                        str(error).splitlines()[0] if str(error) else "",
                        "; logging offline instead" if attempt == "online" else "; training goes on without it")
            continue
        if attempt == "offline":
            log.info("wandb: offline run %s; upload it with `wandb sync %s`", run.id, run.dir.removesuffix("/files"))
        else:
            log.info("wandb: %s", run.url)
        return run
    return None
