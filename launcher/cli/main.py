"""`python -m launcher ...` and `torchrun ... -m launcher ...`: build the config, then train or start workers."""

from __future__ import annotations

import logging
import os
import sys

from omegaconf import OmegaConf

from launcher.cli.args import USAGE, parse_command_line
from launcher.cli.outcome import Outcome
from launcher.cli.sweep import sweep_task
from launcher.config.build import build_config, freeze, load_yaml, parse_overrides, recipe_name_from, validate
from launcher.config.reference import help_listing
from launcher.distributed import early_signals
from launcher.distributed.env import DistEnv
from launcher.distributed.group import end_with_parent
from launcher.distributed.stop import StopSignals
from launcher.errors import LauncherError
from launcher.recipe import load_recipe
from launcher.run.directory import run_dir_for
from launcher.tracking.terminal import setup_logging


def load(argv: list[str]):
    """The command line -> (parsed command line, recipe, merged config: not yet validated, still writable)."""
    command = parse_command_line(argv)
    if command.help:
        return command, None, None
    yaml_values = load_yaml(command.config_file) if command.config_file else {}
    overrides = parse_overrides(command.overrides + (["log.level=warning"] if command.quiet else []))
    if command.sweep_task:
        task = sweep_task(command.sweep_task)
        overrides += parse_overrides(task.overrides, task.origin)
        logging.getLogger("launcher").info("sweep task %d (%s): %s", task.task, task.origin, " ".join(task.overrides))
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


def main(argv: list[str] | None = None) -> int:
    """Run the command line; every way it can end is an exit code (cli/outcome.py), never a traceback from here."""
    argv = sys.argv[1:] if argv is None else argv
    dist_env = DistEnv.from_environ(os.environ)
    setup_logging(dist_env)
    outcome = Outcome(dist_env)
    signals = StopSignals(dist_env)  # from the start: a Ctrl-C during setup stops too, without a traceback
    if dist_env.under_torchrun:
        end_with_parent(early_signals.PARENT)
    try:
        command, recipe, cfg = load_validated(argv, dist_env)
    except LauncherError as error:
        error.same_on_all_ranks = True  # every rank reads the same command line and files
        return outcome.failed(error)
    if command.help:
        print(USAGE + "\n" + help_listing(), end="")
        return 0
    setup_logging(dist_env, cfg.log.level)
    if command.print_config:
        derived = "" if cfg.run.dir else " (run.dir '': runs/<recipe>/<run.name, or the name derived from the config>)"
        print(f"# the run's directory: {run_dir_for(cfg, recipe)}{derived}")
        print(OmegaConf.to_yaml(cfg), end="")
        return 0
    if not dist_env.under_torchrun and cfg.dist.nproc_per_node > 1:
        return _start_workers(argv, cfg, recipe, outcome)
    from launcher.distributed.stop import StopRequested
    from launcher.engine.worker import run_worker

    try:
        run_worker(cfg, recipe, dist_env, signals)
    except StopRequested as stopped:
        return outcome.stopped(stopped)
    except LauncherError as error:
        return outcome.failed(error)
    except (Exception, KeyboardInterrupt, SystemExit) as error:  # a recipe's sys.exit too: one line
        return outcome.crashed(error)
    if dist_env.is_main and not cfg.eval.only and cfg.log.level in ("warning", "error"):
        print(f"launcher: done; model: {run_dir_for(cfg, recipe) / 'model.pt'}")  # --quiet still says the result
    return outcome.finished()


def _start_workers(argv: list[str], cfg, recipe, outcome: Outcome) -> int:
    """`python -m launcher dist.nproc_per_node=N`: N workers through torch's own torchrun, from this process."""
    from launcher.cli.workers import launch_workers
    from launcher.run.directory import new_run_id
    from launcher.run.lock import RunLock

    job = new_run_id()
    try:
        if not cfg.eval.only:  # a directory in use, or one that cannot be written, fails before any worker starts
            RunLock(run_dir_for(cfg, recipe), job).check_free()
    except LauncherError as error:
        return outcome.failed(error)
    return launch_workers(argv, cfg.dist.nproc_per_node, job)


def exit_process(code: int) -> None:
    """End the process with ``code``. A worker of a job ends without Python's finalization.

    DDP leaves the gloo process group alive past destroy_process_group (torch.distributed.nn.functional, imported
    by DDP once the group exists, keeps it as its functions' default argument), and with it gloo's worker threads.
    When such a thread finishes a collective on tensors Python created (all_gather_object's, the stop flags), it
    releases them under the GIL; if the main thread is finalizing by then, Python 3.11 ends the thread with
    pthread_exit inside a C++ destructor, and the process aborts ("terminate called without an active
    exception") after the run succeeded. So a worker runs the exit handlers and flushes its streams, then exits
    at once: gloo's threads never meet a finalizing interpreter.
    """
    if "LOCAL_RANK" not in os.environ:  # not a torchrun worker: no process group
        sys.exit(code)
    import atexit
    import logging

    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
