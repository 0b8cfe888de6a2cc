"""`python -m launcher.slurm`: check a run's config and recipe here, then render a template of `slurm/` and submit.

A typo fails in a second at the prompt, not after hours in the queue.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

from launcher.cli.main import load
from launcher.cli.sweep import sweep_tasks
from launcher.config.build import freeze, validate
from launcher.errors import LauncherError, UserError
from launcher.packaged import templates_dir

TEMPLATES = {"single": "single_node.sbatch", "multi": "multi_node.sbatch", "array": "array.sbatch"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m launcher.slurm",
        description="Validate a launcher run, then submit it to Slurm with a template from slurm/.",
        epilog="example: python -m launcher.slurm multi --nodes 2 --gpus-per-node 8 --time 04:00:00 recipe=lenet",
    )
    parser.add_argument("template", choices=sorted(TEMPLATES), help="single node, multi node, or array sweep")
    parser.add_argument("overrides", nargs="*", help="the launcher's key=value overrides, e.g. recipe=lenet")
    parser.add_argument("--nodes", type=int, default=None, help="nodes (multi; default 2)")
    parser.add_argument("--gpus-per-node", type=int, default=None, help="GPUs to ask for on each node")
    parser.add_argument("--nproc-per-node", type=int, default=None,
                        help="processes per node (default: --gpus-per-node, else 1)")
    parser.add_argument("--partition", help="Slurm partition")
    parser.add_argument("--time", help="time limit, e.g. 04:00:00")
    parser.add_argument("--account", help="Slurm account")
    parser.add_argument("--job-name", help="job name (logs are logs/<job name>-<job id>.out)")
    parser.add_argument("--sweep", help="array: a file with one line of overrides per task")
    parser.add_argument("--config", help="a YAML file of keys, as `python -m launcher --config FILE` takes")
    parser.add_argument("--cpus-per-task", type=int, default=None,
                        help="CPUs for each node's task, shared by its processes and their data loaders "
                             "(default: 4 per process)")
    parser.add_argument("--sbatch-arg", action="append", default=[], help="any other sbatch option, repeatable")
    parser.add_argument("--dry-run", action="store_true",
                        help="write the script and print it with its sbatch command; submit nothing")
    return parser.parse_intermixed_args(argv)


def check_run(launcher_args: list[str], world_size: int, nproc: int) -> str:
    """Build and validate the config (loading the recipe) as the job's workers will; returns the recipe name."""
    command, recipe, cfg = load(launcher_args)
    if command.help or command.print_config:
        raise UserError("pass only key=value overrides after the template")
    validate(cfg, world_size, nproc, local_gpus=False)  # the GPUs are on the compute nodes, not here
    freeze(cfg)
    return recipe.name


def sbatch_options(args: argparse.Namespace, nodes: int, tasks: int | None) -> dict[str, str]:
    options = {"nodes": str(nodes)}
    for key in ("partition", "time", "account", "job_name"):
        if getattr(args, key):
            options[key.replace("_", "-")] = getattr(args, key)
    if args.gpus_per_node:
        options["gpus-per-node"] = str(args.gpus_per_node)
    options["cpus-per-task"] = str(args.cpus_per_task or 4 * (args.nproc_per_node or args.gpus_per_node or 1))
    if tasks:
        options["array"] = f"1-{tasks}"
    return options


def render(template: str, options: dict[str, str], nproc: int) -> str:
    """The template with its #SBATCH options replaced or added, and the templates' folder and process count fixed."""
    lines = (templates_dir() / template).read_text().splitlines()
    directives = [i for i, line in enumerate(lines) if line.startswith("#SBATCH ")]
    remaining = dict(options)
    for i in directives:
        key = lines[i].split()[1].lstrip("-").split("=")[0]
        if key in remaining:
            lines[i] = f"#SBATCH --{key}={remaining.pop(key)}"
    extra = [f"#SBATCH --{key}={value}" for key, value in remaining.items()]
    exports = [f"export LAUNCHER_TEMPLATES={shlex.quote(str(templates_dir()))}", f"export LAUNCHER_NPROC={nproc}"]
    last = directives[-1] + 1
    return "\n".join(lines[:last] + extra + lines[last:last + 1] + exports + lines[last + 1:]) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    nodes = args.nodes or (2 if args.template == "multi" else 1)
    nproc = args.nproc_per_node or args.gpus_per_node or 1
    try:
        if args.template != "multi" and nodes != 1:
            raise UserError(f"--nodes {nodes}: the {args.template} template runs on one node; use `multi`")
        if args.template == "array" and not args.sweep:
            raise UserError("the array template needs --sweep FILE")
        config = ["--config", str(Path(args.config).resolve())] if args.config else []
        tasks = sweep_tasks(args.sweep) if args.template == "array" else None
        for task in tasks or [None]:
            check_run(args.overrides + config + (["--sweep-task", f"{task.file}:{task.task}"] if task else []),
                      nodes * nproc, nproc)
    except LauncherError as error:
        print(f"launcher.slurm: error: {error}", file=sys.stderr)
        return error.exit_code
    script = render(TEMPLATES[args.template], sbatch_options(args, nodes, len(tasks) if tasks else None), nproc)
    script_args = ([str(Path(args.sweep).resolve())] if tasks else []) + args.overrides + config
    logs = Path("logs")
    script_file = logs / f"{args.job_name or 'launcher'}-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    command = ["sbatch", *args.sbatch_arg, str(script_file), *script_args]
    logs.mkdir(exist_ok=True)
    script_file.write_text(script)
    if args.dry_run:  # the script is written, as for a submission: `sbatch` it as printed, or read it
        print(f"# {shlex.join(command)}\n{script}", end="")
        return 0
    return subprocess.run(command).returncode


if __name__ == "__main__":
    sys.exit(main())
