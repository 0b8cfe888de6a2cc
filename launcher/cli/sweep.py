"""Sweep files: one task per line of `key=value` overrides, split as a shell would.

Quotes keep spaces. A line splits the same when `python -m launcher.slurm` checks the file and when an array task runs
it (`--sweep-task FILE:N`).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from launcher.errors import UserError


@dataclass(frozen=True)
class SweepTask:
    file: str
    task: int  # 1-based, as Slurm's array task ids
    line: int  # the file's line it comes from
    overrides: tuple[str, ...]

    @property
    def origin(self) -> str:
        return f"{self.file} line {self.line}"


def sweep_tasks(path: str) -> list[SweepTask]:
    """The file's task lines (neither blank nor a # comment), each split into its overrides."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--sweep {path}: no such file")
    tasks = []
    for number, text in enumerate(file.read_text().splitlines(), 1):
        if not text.strip() or text.strip().startswith("#"):
            continue
        try:
            overrides = shlex.split(text)
        except ValueError as error:
            raise UserError(f"{path} line {number}: {error} in: {text.strip()}") from None
        tasks.append(SweepTask(path, len(tasks) + 1, number, tuple(overrides)))
    if not tasks:
        raise UserError(f"--sweep {path}: no task lines (one line of key=value overrides per task)")
    return tasks


def sweep_task(spec: str) -> SweepTask:
    """``FILE:N``: the N-th task of a sweep file."""
    path, _, number = spec.rpartition(":")
    if not path or not number.isdigit():
        raise UserError(f"--sweep-task {spec}: expected FILE:N, e.g. --sweep-task sweep.txt:3")
    tasks = sweep_tasks(path)
    if not 1 <= int(number) <= len(tasks):
        raise UserError(f"--sweep-task {spec}: {path} has {len(tasks)} task lines")
    return tasks[int(number) - 1]
