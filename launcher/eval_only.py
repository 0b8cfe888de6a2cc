"""`eval.only=true`: evaluate a checkpoint or a model.pt, like torchvision's --test-only."""

from __future__ import annotations

import logging

from launcher.agree import run_agreed
from launcher.checkpoint import Checkpointer, check_model_fits
from launcher.dist_env import DistEnv
from launcher.errors import UserError
from launcher.evaluate import evaluate
from launcher.resume import choose_checkpoint, is_checkpoint, load_for_resume

log = logging.getLogger(__name__)


def evaluate_checkpoint(cfg, model, eval_set, recipe, checkpointer: Checkpointer, dist_env: DistEnv, device) -> None:
    """``eval.only=true``: evaluate a checkpoint or model.pt (``ckpt.resume``) and print the metrics."""
    path, payload = choose_checkpoint(cfg, checkpointer, dist_env, allow_model=True)
    if path is None:
        raise UserError(f"eval.only=true found no checkpoint or model.pt in run.dir={checkpointer.folder.parent}: "
                        "pass ckpt.resume=<checkpoint or model.pt>", same_on_all_ranks=True)
    if eval_set is None:
        raise UserError("eval.only=true, but the recipe's build_datasets returns no eval set", same_on_all_ranks=True)

    def load_weights():
        loaded = payload or load_for_resume(path)
        weights = loaded["model"] if is_checkpoint(loaded) else loaded
        check_model_fits(model, weights, path)
        model.load_state_dict(weights)

    run_agreed(dist_env, load_weights)
    if cfg.eval.sharded or dist_env.is_main:
        metrics = evaluate(model, eval_set, recipe.loss, cfg, device, dist_env, sharded=cfg.eval.sharded,
                           predict=recipe.predictions)
    if dist_env.is_main:
        log.info("evaluated %s | %s", path, " | ".join(f"{key} {value:.4f}" for key, value in metrics.items()))
