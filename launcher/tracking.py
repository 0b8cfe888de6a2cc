"""wandb on rank 0: one run per job, continued across restarts and requeues, never a reason for training to fail."""

from __future__ import annotations

import logging
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

    Records at or before ``logged_through`` were logged before a restart; they are skipped, so the run's history
    never goes back a step.
    """

    def __init__(self, run, logged_through: int):
        self.run = run
        self.logged_through = logged_through

    @property
    def id(self) -> str:
        return self.run.id

    def log(self, record: dict) -> None:
        if self.run is None or record["step"] <= self.logged_through:
            return
        values = {key: value for key, value in record.items() if key != "step"}
        self._guard(lambda: self.run.log(values, step=record["step"]))

    def save_summary(self, parameters: int, trainable: int, summary_text: str | None) -> None:
        """The parameter counts and the torchsummary table, in the run's summary."""
        values = {"parameters": parameters, "parameters_trainable": trainable}
        if summary_text:
            values["model_summary"] = summary_text
        self._guard(lambda: self.run.summary.update(values))

    def finish(self) -> None:
        self._guard(self.run.finish)
        self.run = None

    def _guard(self, action) -> None:
        if self.run is None:
            return
        try:
            action()
        except Exception as error:
            log.warning("wandb failed (%s: %s); training goes on, metrics stay in metrics.jsonl",
                        type(error).__name__, error)
            self.run = None


def start_wandb(cfg, run_dir: Path, job_group: str | None, run_id: str | None, logged_through: int):
    """Rank 0: start or continue (``run_id``) the job's wandb run; None when wandb is disabled or fails."""
    if cfg.wandb.mode == "disabled":
        return None
    import wandb

    mode = cfg.wandb.mode
    if mode == "auto":
        mode = "online" if _has_credentials() else "offline"
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
        # No console capture (the launcher logs itself), no hanging without a network.
        settings=wandb.Settings(silent=True, console="off", init_timeout=30),
    )
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
        return WandbRun(run, logged_through)
    return None
