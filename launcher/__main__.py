"""`python -m launcher ...` and `torchrun ... -m launcher ...`: build the config, then train or start workers."""

from __future__ import annotations

import os
import sys

from omegaconf import OmegaConf
from torch.distributed.elastic.multiprocessing.errors import record

from launcher.cli import USAGE, parse_command_line
from launcher.config import build_config, freeze, load_yaml, parse_overrides, recipe_name_from, validate
from launcher.dist_env import DistEnv
from launcher.errors import LauncherError
from launcher.logs import setup_logging
from launcher.recipe import load_recipe


def load(argv: list[str]):
    """The command line -> (parsed command line, recipe, merged config: not yet validated, still writable)."""
    command = parse_command_line(argv)
    if command.help:
        return command, None, None
    yaml_values = load_yaml(command.config_file) if command.config_file else {}
    overrides = parse_overrides(command.overrides + (["log.level=warning"] if command.quiet else []))
    recipe_spec = recipe_name_from(yaml_values, overrides)
    recipe = load_recipe(recipe_spec)
    cfg = build_config(recipe.defaults, yaml_values, overrides, f"recipe {recipe.name} DEFAULTS")
    cfg.recipe = recipe_spec
    return command, recipe, cfg


def load_validated(argv: list[str], dist_env: DistEnv):
    """``load``, then validated for the world this process is in (or will start) and made read-only."""
    command, recipe, cfg = load(argv)
    if command.help:
        return command, recipe, cfg
    if dist_env.under_torchrun:
        validate(cfg, dist_env.world_size, dist_env.local_world_size)
    else:
        validate(cfg, cfg.dist.nproc_per_node, cfg.dist.nproc_per_node)
    return command, recipe, freeze(cfg)


@record
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    dist_env = DistEnv.from_environ(os.environ)
    setup_logging(dist_env)
    try:
        command, recipe, cfg = load_validated(argv, dist_env)
    except LauncherError as error:
        error.same_on_all_ranks = True  # every rank reads the same command line and files
        return report(error, dist_env)
    try:
        if command.help:
            print(USAGE)
            return 0
        setup_logging(dist_env, cfg.log.level)
        if command.print_config:
            print("# run.dir '' means runs/<recipe>/<run id>, the id chosen when the run starts")
            print(OmegaConf.to_yaml(cfg), end="")
            return 0
        if dist_env.under_torchrun or cfg.dist.nproc_per_node == 1:
            from launcher.worker import run_worker

            run_worker(cfg, recipe, dist_env)
            return 0
        from launcher.run_dir import new_run_id, run_dir_for
        from launcher.run_lock import RunLock
        from launcher.spawn import launch_workers

        job = new_run_id()
        if not cfg.eval.only:  # a directory in use, or one that cannot be written, fails before any worker starts
            RunLock(run_dir_for(cfg, recipe), job).check_free()
        return launch_workers(argv, cfg.dist.nproc_per_node, job)
    except LauncherError as error:
        return report(error, dist_env)


def report(error: LauncherError, dist_env: DistEnv) -> int:
    """Print the error once (rank 0) when every rank has it, else from the rank that has it; give the exit code."""
    if dist_env.is_main or not error.same_on_all_ranks:
        where = f"[rank {dist_env.rank}] " if dist_env.is_distributed and not error.same_on_all_ranks else ""
        print(f"{where}launcher: {error.prefix}{error}", file=sys.stderr)
    return error.exit_code


if __name__ == "__main__":
    sys.exit(main())
