"""`eval.only=true`: evaluate a checkpoint or a model.pt, like torchvision's --test-only."""

from __future__ import annotations

import logging
from pathlib import Path

from launcher.agree import run_agreed
from launcher.checkpoint import check_model_fits
from launcher.dist_env import DistEnv
from launcher.errors import UserError
from launcher.evaluate import evaluate
from launcher.resume import checkpoint_to_evaluate, is_checkpoint, load_named

log = logging.getLogger(__name__)


def evaluate_checkpoint(cfg, model, eval_set, recipe, run_dir: Path, dist_env: DistEnv, device) -> None:
    """``eval.only=true``: evaluate a checkpoint or model.pt (``ckpt.resume``) and print the metrics."""
    if eval_set is None:
        raise UserError("eval.only=true, but the recipe's build_datasets returns no eval set", same_on_all_ranks=True)
    path, payload = checkpoint_to_evaluate(cfg, run_dir, dist_env)

    def load_weights():
        loaded = payload or load_named(path)
        weights = loaded["model"] if is_checkpoint(loaded) else loaded
        check_model_fits(model, weights, path)
        model.load_state_dict(weights)

    run_agreed(dist_env, load_weights)
    if cfg.eval.sharded or dist_env.is_main:
        metrics = evaluate(model, eval_set, recipe.loss, cfg, device, dist_env, sharded=cfg.eval.sharded,
                           predict=recipe.predictions)
    if dist_env.is_main:
        log.info("evaluated %s | %s", path, " | ".join(f"{key} {value:.4f}" for key, value in metrics.items()))
