"""What a worker must catch before it imports torch, which takes seconds.

Stop signals that arrive meanwhile are kept for ``StopSignals`` instead of ending the process mid-import (torchrun may
be tearing the job down because another rank failed first, and this rank's own line, or its error file, should still be
written). The process that started the worker is kept too (``end_with_parent`` compares against it). Standard library
only, so it can run first.
"""

from __future__ import annotations

import os
import signal

HELD: list[int] = []
PARENT: int | None = None  # the parent process at this process's start


def hold() -> None:
    global PARENT
    PARENT = os.getppid()
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
        signal.signal(signum, lambda number, frame: HELD.append(number))
