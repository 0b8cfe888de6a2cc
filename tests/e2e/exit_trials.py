"""Many two-process starts of the launcher, cheaply: ``python tests/exit_trials.py TRIALS WORKDIR ARGS...``.

torch and the launcher are imported once, with what a worker imports on its way to its first step; each trial forks
two workers that take the environment torchrun would give them and run ``python -m launcher ARGS`` as its
``__main__`` does, to the end of the process ("{trial}" in ARGS: the trial's number). Prints one JSON line: the
trials, and for each abnormal end (a signal, or an abort message) the trial, rank, status and output's tail.
"""

from __future__ import annotations

import json
import os
import runpy
import socket
import sys
from pathlib import Path

import torch  # noqa: F401  (imported once, before forking)
import torch._dynamo  # noqa: F401  (which every worker's optimizer imports, a second and more of CPU per start)

import launcher.__main__  # noqa: F401
import launcher.engine.worker  # noqa: F401


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def worker(rank: int, port: int, args: list[str], log: Path) -> None:
    """The child: torchrun's environment, output to ``log``, then the launcher's __main__ to the process's end."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHELASTIC_RUN_ID="exit-trials",
                      OMP_NUM_THREADS="1")
    sys.argv = ["launcher", *args]
    try:
        runpy.run_module("launcher", run_name="__main__", alter_sys=True)
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 1
    else:
        code = 0
    sys.exit(code)  # the interpreter's normal end: finalization included


def main() -> None:
    trials, workdir, args = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    os.chdir(workdir)
    bad = []
    for trial in range(trials):
        port, children = free_port(), {}
        for rank in (0, 1):
            log = workdir / f"trial-{trial}-rank-{rank}.log"
            pid = os.fork()
            if pid == 0:
                worker(rank, port, [arg.replace("{trial}", str(trial)) for arg in args], log)
            children[pid] = (rank, log)
        for pid, (rank, log) in children.items():
            _, status = os.waitpid(pid, 0)
            text = log.read_text(errors="replace")
            aborted = "terminate called" in text or "Fatal Python error" in text
            if os.WIFSIGNALED(status) or aborted:
                bad.append({"trial": trial, "rank": rank, "status": status, "tail": text[-600:]})
            log.unlink()
    print(json.dumps({"trials": trials, "abnormal": bad}))


if __name__ == "__main__":
    main()
