"""How a process's part of a run ended, told every way a caller reads it.

Those are the exit code, one line on stderr, the status file a script asked for (``LAUNCHER_STATUS_FILE``), and
torchrun's error file (its report's root cause).

    0   finished (or, under torchrun --max-restarts, stopped: see ``stopped``)
    75  stopped on a signal, checkpoint written: the same command continues
    2   a mistake in what the user gave (config, recipe, data): the line says what would work
    1   anything else failed
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from launcher.distributed.env import DistEnv
from launcher.errors import LauncherError, PeerFailed, as_launcher_error

STATUS_FILE_ENV = "LAUNCHER_STATUS_FILE"


class Outcome:
    """Ends a process's part of a run in one of the designed ways; rank 0 (or a lone process) writes the status."""

    def __init__(self, dist_env: DistEnv):
        self.dist_env = dist_env

    def finished(self) -> int:
        self._status("finished")
        return 0

    def stopped(self, stop: LauncherError) -> int:
        """A graceful stop.

        Under torchrun --max-restarts the exit code is 0, or torchrun would start the job again; the status file and
        history.jsonl still say "stopped".
        """
        restarts = self.dist_env.max_restarts > 0
        note = " (exit 0, so torchrun --max-restarts does not start the job again)" if restarts else ""
        self._print(f"launcher: {stop}{note}", stop.same_on_all_ranks)
        self._status("stopped")
        return 0 if restarts else stop.exit_code

    def failed(self, error: LauncherError) -> int:
        line = f"launcher: {error.prefix}{error}"
        if not error.repeats:
            self._print(line, error.same_on_all_ranks)
        # torchrun takes the earliest error file as the root cause: a rank that only waited for another is later.
        self._error_file(line, later=isinstance(error, PeerFailed) or bool(error.repeats))
        self._status("failed")
        return error.exit_code

    def crashed(self, error: BaseException) -> int:
        """An exception from the recipe's code, or from torch under it.

        Told as its message, then where it was raised in the user's code (errors.describe); exit 2 where the fault is
        the recipe's.
        """
        return self.failed(as_launcher_error(error))

    def _print(self, text: str, same_on_all_ranks: bool) -> None:
        if self.dist_env.is_main or not same_on_all_ranks:
            where = f"[rank {self.dist_env.rank}] " if self.dist_env.is_distributed and not same_on_all_ranks else ""
            print(f"{where}{text}", file=sys.stderr, flush=True)

    def _error_file(self, text: str, later: bool = False) -> None:
        """torchrun's report names the first failed rank's error file as the root cause: ours, not <N/A>."""
        path = os.environ.get("TORCHELASTIC_ERROR_FILE")
        if path:  # the layout torch's ErrorHandler writes, with our text where it puts a traceback
            stamp = str(int(time.time()) + (1 if later else 0))
            record = {"message": text, "extraInfo": {"py_callstack": text, "timestamp": stamp}}
            Path(path).write_text(json.dumps({"message": record}))

    def _status(self, word: str) -> None:
        path = os.environ.get(STATUS_FILE_ENV)
        if path and self.dist_env.is_main:
            tmp = Path(f"{path}.{os.getpid()}.tmp")
            try:
                tmp.parent.mkdir(parents=True, exist_ok=True)
                tmp.write_text(word + "\n")
                os.replace(tmp, path)
            except OSError as error:
                print(f"launcher: cannot write {STATUS_FILE_ENV}={path} ({error.strerror})", file=sys.stderr)


def read_status(path: str) -> str | None:
    """What a run's rank 0 wrote to its status file, if it wrote one."""
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None
