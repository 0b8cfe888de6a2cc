"""Stop signals that arrive while a worker is still importing torch (seconds), kept for ``StopSignals`` instead of
ending the process mid-import: torchrun may be tearing the job down because another rank failed first, and this
rank's own line (or its error file) should still be written. Standard library only, so it can run first."""

from __future__ import annotations

import signal

HELD: list[int] = []


def hold() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
        signal.signal(signum, lambda number, frame: HELD.append(number))
