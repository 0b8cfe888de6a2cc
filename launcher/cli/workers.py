"""Starting worker processes from a plain `python -m launcher ...` through torch's own torchrun."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

from launcher.cli.outcome import STATUS_FILE_ENV, read_status
from launcher.distributed.stop import STOP_EXIT_CODE, STOP_SIGNALS

# torchrun passes these on to the workers when this process gets them (its default list lacks SIGUSR1/2, which
# would otherwise end this process at once and leave the workers running); after the workers' graceful stop it
# waits this long (torch's TORCH_ELASTIC_SHUTDOWN_TIMEOUT, 30 s by default, too short for a large checkpoint).
FORWARDED_SIGNALS = ",".join(sorted({sig.name for sig in STOP_SIGNALS} | {"SIGHUP", "SIGQUIT"}))
SHUTDOWN_TIMEOUT_S = "600"
NO_ERROR_FILE = "<N/A>"  # torch's ProcessFailure.error_file for a worker that wrote none


def launch_workers(argv: list[str], nproc_per_node: int, run_id: str) -> int:
    """Run ``python -m launcher <argv>`` in ``nproc_per_node`` processes on this node; returns the exit code.

    The run id becomes torchrun's rendezvous id, which the workers read as the job id. A stop signal to this
    process reaches every worker (which stops gracefully) and ends it with 75, as a worker's own stop does; a
    second one aborts.
    """
    args = parse_args([
        "--nnodes=1",
        f"--nproc-per-node={nproc_per_node}",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=localhost:0",
        f"--rdzv-id={run_id}",
        f"--signals-to-handle={FORWARDED_SIGNALS}",
        "-m",
        "launcher",
        *argv,
    ])
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", SHUTDOWN_TIMEOUT_S)
    _quiet_torchrun()
    with tempfile.TemporaryDirectory(prefix="launcher-") as folder:
        status_file = os.environ.setdefault(STATUS_FILE_ENV, str(Path(folder) / "status"))
        try:
            run(args)
        except ChildFailedError as error:
            return _failed(error)
        except SignalException as caught:
            status = read_status(status_file)
            if status == "stopped":  # the workers stopped gracefully and said so
                return STOP_EXIT_CODE
            if status == "finished":
                return 0
            print(f"launcher: {caught.sigval.name}: the workers ended without a checkpoint", file=sys.stderr,
                  flush=True)
            return 128 + caught.sigval
    return 0


def _quiet_torchrun() -> None:
    """Leave out torchrun's warnings: the OMP_NUM_THREADS banner, and each signal it passes on.

    This process's own lines say what matters; torchrun's errors still show, and its LOGLEVEL setting shows them all.
    """
    if "LOGLEVEL" in os.environ:
        return
    for name in list(logging.root.manager.loggerDict):
        if name == "torch.distributed.run" or name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.ERROR)


def _failed(error: ChildFailedError) -> int:
    """The exit code of a job that a worker left with a non-zero code; one line if no worker said why.

    A worker that ended in one of the designed ways wrote torchrun's error file (cli/outcome.py), having printed its
    line or left it to the rank that printed it; a stop (75) is said by rank 0. Only a worker that died without a
    word (a signal, os._exit) leaves the line to this process.
    """
    rank, first = error.get_first_failure()
    said = any(failure.error_file != NO_ERROR_FILE for failure in error.failures.values())
    if not said and first.exitcode != STOP_EXIT_CODE:
        how = f"was killed by {first.signal_name()}" if first.exitcode < 0 else f"exited with code {first.exitcode}"
        print(f"launcher: error: worker rank {rank} {how} without saying why (its output, if any, is above)",
              file=sys.stderr, flush=True)
    designed = first.exitcode in (2, STOP_EXIT_CODE) or first.exitcode > 128  # 128 + n: aborted by signal n
    return first.exitcode if designed else 1
