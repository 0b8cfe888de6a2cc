"""The command line: `key=value` overrides plus a few flags, the same under python and torchrun."""

from __future__ import annotations

from dataclasses import dataclass, field

from launcher.errors import UserError

USAGE = """\
usage: python -m launcher recipe=NAME [key=value ...] [--config FILE] [--cfg]
       torchrun [torchrun options] -m launcher recipe=NAME [key=value ...]

  recipe=NAME     a recipe: a short name from recipes/ (digits, lenet, ...), a dotted module path, or a .py file
  key=value       set a config key, e.g. train.epochs=3 optim.lr=0.05 dist.nproc_per_node=2
  --config FILE   a YAML file of keys, applied before the key=value overrides
  --sweep-task FILE:N
                  also the overrides of the N-th task line of a sweep file (Slurm array jobs pass this)
  --cfg           print the fully resolved config and exit
  --quiet         only warnings and errors (log.level=warning)
  -h, --help      this text, and every key

A run's values, its recipe's keys included: python -m launcher recipe=NAME --cfg
"""


@dataclass
class CommandLine:
    overrides: list[str] = field(default_factory=list)
    config_file: str | None = None
    sweep_task: str | None = None  # FILE:N
    print_config: bool = False
    quiet: bool = False
    help: bool = False


def parse_command_line(argv: list[str]) -> CommandLine:
    parsed = CommandLine()
    items = iter(argv)
    for item in items:
        if item in ("-h", "--help"):
            parsed.help = True
        elif item == "--cfg":
            parsed.print_config = True
        elif item in ("-q", "--quiet"):
            parsed.quiet = True
        elif item == "--config" or item.startswith("--config="):
            parsed.config_file = item.partition("=")[2] or next(items, None)
            if not parsed.config_file:
                raise UserError("--config needs a file: --config my_run.yaml")
        elif item == "--sweep-task" or item.startswith("--sweep-task="):
            parsed.sweep_task = item.partition("=")[2] or next(items, None)
            if not parsed.sweep_task:
                raise UserError("--sweep-task needs FILE:N, e.g. --sweep-task sweep.txt:3")
        elif item.startswith("-"):
            raise UserError(f"unknown option '{item}': options are --config FILE, --sweep-task FILE:N, --cfg, "
                            "--quiet, --help")
        else:
            parsed.overrides.append(item)
    return parsed
